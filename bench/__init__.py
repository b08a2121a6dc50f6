"""Fan-out benchmark: dualcast side by side with python-socketio and broadcaster.

    python -m bench saturation      # 1,000 clients, raise the rate until p99 > 250 ms or loss
    python -m bench matrix          # clients 100/1000 x 100/1000 events/s
    python -m bench idle            # RSS per idle connection, heartbeat CPU at 10,000
    python -m bench routing         # one room's events among 10,000 vs 100 subscribers
    python -m bench poll            # 1,000 long-pollers at 20 events/s
    python -m bench workers         # the same load on serve --workers 1 and 2, per delivery
    python -m bench.memtrace        # what an idle connection holds, by traceback (tracemalloc)
    python -m bench --docs all      # everything, then rewrite docs/performance.md

Peers come from the `bench` extra (`pip install -e '.[bench]'`). Results go to
bench/results/ (JSON lines + Markdown). BENCH_PROFILE=<dir> samples the server with
py-spy during each measured step; BENCH_DUALCAST_ROOT=<checkout> serves another tree.
"""
