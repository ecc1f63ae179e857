"""Peak memory of this process, for the run summary."""

import resource


def peak_rss() -> int:
    """This process's own peak resident set size in bytes.

    Read from /proc (VmHWM): getrusage's ru_maxrss also counts the peak of the process
    that started this one, which would misreport a merge launched from a big process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
