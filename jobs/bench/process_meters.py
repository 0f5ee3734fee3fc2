"""What the pipeline's processes cost, read from /proc: CPU seconds per kind of Ray process
(:class:`ProcessCpu`) and the driver's peak resident memory (:class:`PeakRss`)."""
from __future__ import annotations

import os


class ProcessCpu:
    """CPU seconds of this process's descendants (the local Ray), sampled from /proc every
    ``interval`` s while running; a process's last sample counts after it exits.

    Groups by process title (Ray retitles a worker ``ray::<what it runs>``; the latest title wins,
    so an idle worker that became a feature actor counts as one from its start): ``actors``
    (feature actors, decode fused in), ``tasks`` (hash/write tasks, idle workers), ``aggregators``,
    ``ray_data`` (Ray Data's helper actors), ``daemons`` (GCS, raylet, Ray's agents), ``driver``
    (a benchmark child driver).
    """

    DAEMON_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    #: Ray's native daemons; the raylet's command line names ``default_worker.py`` (the command it
    #: starts workers with), so it is recognised by its executable, not by that substring.
    DAEMON_EXECUTABLES = ("raylet", "gcs_server")

    def __init__(self, root: int | None = None, interval: float = 0.25):
        import threading

        self.root, self.interval = root or os.getpid(), interval
        self._seen: dict[tuple[int, int], tuple[str, float]] = {}
        self._titles: dict[tuple[int, int], str] = {}
        self._roles: dict[tuple[int, int], list[str]] = {}  # every ray::… title a worker had, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ProcessCpu":
        self._scan()
        self._baseline = dict(self._seen)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()

    RAY_DATA_TITLES = ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::ActorLocationTracker")
    GROUPS = ("actors", "tasks", "aggregators", "ray_data", "daemons", "driver")
    WORKERS = ("actors", "tasks", "aggregators", "ray_data")  # what the pipeline's work costs
    SPECIFIC = ("actors", "aggregators", "ray_data", "driver")

    @classmethod
    def group(cls, title: str) -> str:
        if os.path.basename(title.split(" ", 1)[0]) in cls.DAEMON_EXECUTABLES:
            return "daemons"
        if "benchmark.py" in title:
            return "driver"
        if "FeatureActor" in title:
            return "actors"
        if "AuditAggregator" in title:
            return "aggregators"
        if title.startswith(cls.RAY_DATA_TITLES):
            return "ray_data"
        if title.startswith(cls.DAEMON_TITLES) or not (title.startswith("ray::") or "default_worker.py" in title):
            return "daemons"
        return "tasks"

    def _scan(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        parent: dict[int, int] = {}
        stats: dict[int, list[str]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(d)], stats[int(d)] = int(fields[1]), fields
        mine, frontier = set(), {self.root}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier and p not in mine}
            mine |= frontier
        for pid in mine:
            fields = stats[pid]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            key = (pid, int(fields[19]))  # (pid, start time): a reused pid is another process
            cpu = (int(fields[11]) + int(fields[12])) / tick
            old_group, old_cpu = self._seen.get(key, ("", 0.0))
            # an exiting process has an empty title, and a worker's role never goes back to idle
            group = old_group if old_group in self.SPECIFIC or not title.strip() else self.group(title)
            self._seen[key] = (group, max(cpu, old_cpu))
            if title.strip():
                self._titles[key] = short = title.split(" ", 1)[0] if title.startswith("ray::") else title[:80].strip()
                roles = self._roles.setdefault(key, [])
                if short.startswith("ray::") and short != "ray::IDLE" and short not in roles:
                    roles.append(short)

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group spent since ``__enter__``."""
        out = dict.fromkeys(self.GROUPS, 0.0)
        for key, (group, cpu) in self._seen.items():
            out[group] += cpu - self._baseline.get(key, (group, 0.0))[1]
        return out

    def by_title(self) -> list[dict]:
        """Where each group's seconds went: ``{group, title, processes, cpu_s, roles}`` per process title
        (a Ray worker's last ``ray::…`` title; ``roles``: the tasks its processes were seen running, as
        sampled), largest first — to attribute a change between two runs."""
        out: dict[tuple[str, str], list] = {}
        for key, (group, cpu) in self._seen.items():
            row = out.setdefault((group, self._titles.get(key, "?")), [0, 0.0, []])
            row[0] += 1
            row[1] += cpu - self._baseline.get(key, (group, 0.0))[1]
            row[2].append(self._roles.get(key, []))
        rows = [{"group": g, "title": t, "processes": n, "cpu_s": round(c, 2), "roles": roles}
                for (g, t), (n, c, roles) in out.items() if c > 0]
        return sorted(rows, key=lambda r: -r["cpu_s"])


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.peak_mb = interval, rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
