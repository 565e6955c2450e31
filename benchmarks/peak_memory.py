"""Peak memory of a process on Linux, for the benchmarks that measure it in child processes.

    base = rss_kib('VmRSS'); reset_peak_rss(); work(); peak_mib = (rss_kib('VmHWM') - base) / 1024
"""
import re


def rss_kib(field):
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak since the last reset)."""
    with open('/proc/self/status') as f:
        return int(re.search(rf'{field}:\s+(\d+)', f.read()).group(1))


def reset_peak_rss():
    """Make VmHWM (and ru_maxrss) restart from the current resident set size (Linux >= 4.0)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
