"""dockercomp's benchmark (issue 6): end-to-end throughput and latency as ratios against the
raw paho + Mosquitto round trip measured in the same run, plus a scale mode with 1,000
simulated workers. Run it with `make bench` or `python -m bench --help`; results are written
as JSON under bench/results/.
"""
