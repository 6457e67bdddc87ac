"""Priority lane: how long a session's image takes to reach every node while a bulk
warm-up is queued on each, against the same pull on idle nodes and against what a first
come, first served queue gives (the session's image at the back of the warm-up), in the
same run.

    .venv/bin/python -m bench.priority [--nodes 3] [--images 50] [--size-mb 20] [--repeats 3]

Every image (warm-up or session) is distinct, of random bytes, in the local registry.
Three cases, each timed from the publish to the last node's answer:

* idle: a session image pulled (``Publisher.pull``) onto idle nodes, ``--repeats`` times
  each: just before the session lane's warm-up starts and once it has drained (the
  baseline: the median of these, which bracket the loaded samples), and at the end (to
  show drift);
* session lane: ``Publisher.warm`` of ``--images`` images runs in a thread; once every
  node has all its pull slots busy with warm-ups, a session image is pulled; ``--repeats``
  times against the rest of the same warm-up, each only while it still has most of its
  images queued on every node (printed);
* warm lane (today's first come, first served): a second warm-up of ``--images`` fresh
  images, and the session image published as a warm-up behind it; once.

``--max-concurrent-pulls`` sets the workers' ``PULLER_MAX_CONCURRENT_PULLS`` (unset: the
worker's default); ``--layers`` splits each image into that many layers.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from bench.common import BenchEnvironment, bench_environment, print_table, save, stop_all
from contract import Status
from localcluster.cluster import WorkerProcess, metric_value
from publisher import Publisher
from publisher.report import WarmReport
from worker.settings import WorkerSettings

GOAL = 1.5
"""The session's pull with a warm-up queued, at most this many times the idle one."""
DISK_MARGIN = 1.25
GATE_TIMEOUT = 120.0
MIN_SIZE_MB = 1.0


@dataclass
class NodeQueue:
    """One node's warm-up at one moment, from its worker's metrics."""

    in_flight: int
    answered: int
    queued: int


@dataclass
class WarmUp:
    """A ``Publisher.warm`` running in a thread, and how far each node got with it."""

    publisher: Publisher
    images: list[str]
    workers: list[WorkerProcess]
    answers_before: dict[str, float] = field(default_factory=dict)
    other_answers: int = 0
    """Answers per node to anything else since the warm-up began (session pulls)."""
    published: threading.Event = field(default_factory=threading.Event)
    report: WarmReport | None = None
    error: BaseException | None = None
    began: float = 0.0
    seconds: float = 0.0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.answers_before = {w.node: _metrics(w)[1] for w in self.workers}
        self.began = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="warm-up", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.report = self.publisher.warm(
                self.images,
                nodes=[w.node for w in self.workers],
                timeout=3600,
                on_update=lambda _: self.published.set(),
            )
        except BaseException as error:  # handed to the main thread in join()
            self.error = error
        finally:
            self.seconds = time.perf_counter() - self.began
            self.published.set()

    def join(self) -> WarmReport:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the warm-up failed: {self.error!r}") from self.error
        if self.report is None or not self.report.ok:
            raise RuntimeError(f"the warm-up did not succeed: {self.report}")
        return self.report

    def queue(self) -> dict[str, NodeQueue]:
        """Per node: warm pulls running, warm-ups answered, warm-ups still waiting."""
        found = {}
        for worker in self.workers:
            in_flight, answers = _metrics(worker)
            answered = round(answers - self.answers_before[worker.node]) - self.other_answers
            running = round(in_flight)
            found[worker.node] = NodeQueue(
                running, answered, max(0, len(self.images) - answered - running)
            )
        return found

    def wait_all_slots_busy(self, slots: int) -> dict[str, NodeQueue]:
        """Waits until the warm-up is all published and every node runs as many warm pulls
        as it has slots (or as it has warm-ups left); returns the queue at that moment."""
        deadline = time.monotonic() + GATE_TIMEOUT
        if not self.published.wait(GATE_TIMEOUT):
            raise RuntimeError("the warm-up was not published within the gate timeout")
        while True:
            queue = self.queue()
            left = {node: len(self.images) - q.answered for node, q in queue.items()}
            if all(q.in_flight >= min(slots, left[node]) for node, q in queue.items()):
                return queue
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the nodes' warm pulls did not start: {queue}")
            time.sleep(0.02)


def _metrics(worker: WorkerProcess) -> tuple[float, float]:
    """The worker's pulls in flight and answers so far."""
    url = f"http://127.0.0.1:{worker.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return (
        metric_value(text, "puller_worker_pulls_in_flight"),
        metric_value(text, "puller_worker_answers_total"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size-mb", type=float, default=20.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-concurrent-pulls", type=int, default=0)
    args = parser.parse_args(argv)
    slots = args.max_concurrent_pulls or WorkerSettings.max_concurrent_pulls
    worker_env = (
        {"PULLER_MAX_CONCURRENT_PULLS": str(args.max_concurrent_pulls)}
        if args.max_concurrent_pulls
        else {}
    )
    sessions = 4 * args.repeats + 1  # idle three times, the session lane; the warm lane once
    size_mb, disk_note = fit_to_disk(args.size_mb, 2 * args.images + sessions, args.nodes)
    if disk_note:
        print(disk_note)
    layer = int(size_mb * 1_000_000 / args.layers)
    with bench_environment() as environment:
        environment.add_engines(args.nodes)
        workers = environment.start_workers(args.nodes, "prio", None, **worker_env)
        try:
            images = push_images(environment, args.images, args.repeats, layer, args.layers)
            with Publisher(environment.amqp_url) as publisher:
                figures = measure(publisher, workers, images, slots)
        finally:
            stop_all([w.process for w in workers])
    setup: dict[str, object] = {
        "nodes": args.nodes,
        "warm_images": args.images,
        "size_mb": size_mb,
        "layers": args.layers,
        "slots": slots,
        "disk_note": disk_note,
    }
    report(figures, setup, args)
    return 0


def fit_to_disk(size_mb: float, images: int, nodes: int) -> tuple[float, str]:
    """The image size to use: ``size_mb``, or less if /tmp cannot hold every image in the
    registry and on every engine; and a note saying so (empty if not scaled down)."""
    scratch = "/tmp"  # noqa: S108 - where bench_environment puts the engines and the registry
    free_mb = shutil.disk_usage(scratch).free / 1_000_000
    copies = images * (nodes + 1)  # the registry's copy and each engine's
    fits = free_mb / (copies * DISK_MARGIN)
    if fits >= size_mb:
        return size_mb, ""
    if fits < MIN_SIZE_MB:
        raise SystemExit(f"{scratch} has {free_mb:.0f} MB free: too little for {copies} images")
    scaled = float(int(fits))
    return scaled, (
        f"NOTE: {scratch} has {free_mb:.0f} MB free, too little for {images} images of "
        f"{size_mb:g} MB on {nodes} engines and the registry: images are {scaled:g} MB instead"
    )


@dataclass
class Images:
    warm_a: list[str]
    warm_b: list[str]
    idle: list[list[str]]
    """Three sets: before, between and after the loaded cases."""
    session: list[str]
    fifo: str


def push_images(
    environment: BenchEnvironment, count: int, repeats: int, layer: int, layers: int
) -> Images:
    tag = uuid.uuid4().hex[:6]
    names = (
        [f"warm-a{n}" for n in range(count)]
        + [f"warm-b{n}" for n in range(count)]
        + [f"session{n}" for n in range(4 * repeats + 1)]
    )
    print(
        f"pushing {len(names)} images of {layer * layers / 1e6:g} MB ({layers} layers)...",
        flush=True,
    )
    started = time.perf_counter()

    def push(name: str) -> str:
        return environment.registry.push_sized(f"prio/{name}-{tag}", "1", [layer] * layers)

    with ThreadPoolExecutor(max_workers=4) as pool:  # gzip and hashing let go of the GIL
        pushed = list(pool.map(push, names))
    print(f"pushed in {time.perf_counter() - started:.1f} s", flush=True)
    warm_a, warm_b, others = pushed[:count], pushed[count : 2 * count], pushed[2 * count :]
    return Images(
        warm_a=warm_a,
        warm_b=warm_b,
        idle=[others[i * repeats : (i + 1) * repeats] for i in range(3)],
        session=others[3 * repeats : 4 * repeats],
        fifo=others[-1],
    )


@dataclass
class Sample:
    """One session image onto every node: from the publish to the last answer."""

    seconds: float
    node_seconds: dict[str, float]
    """What each node's answer says its pull took."""
    node_queued_seconds: dict[str, float]
    """What each node's answer says the request waited for a slot."""
    queue_at_request: dict[str, NodeQueue] | None = None
    queue_at_answer: dict[str, NodeQueue] | None = None


@dataclass
class Figures:
    idle_before: list[Sample]
    """Just before the session lane's warm-up: the baseline."""
    session_lane: list[Sample]
    idle_between: list[Sample]
    """Once the session lane's warm-up has drained."""
    warm_lane: Sample
    idle_after: list[Sample]
    warm_up_seconds: dict[str, float]

    @staticmethod
    def seconds(samples: list[Sample]) -> list[float]:
        return [s.seconds for s in samples]


def timed_pull(publisher: Publisher, image: str, nodes: int) -> Sample:
    started = time.perf_counter()
    report = publisher.pull(image, expect=nodes, timeout=900)
    seconds = time.perf_counter() - started
    if not report.ok or any(r.status is not Status.PULLED for r in report.nodes):
        raise RuntimeError(f"the session pull failed: {report}")
    return Sample(
        seconds,
        {r.node: r.seconds for r in report.nodes},
        {r.node: r.queued_seconds for r in report.nodes},
    )


def idle_pulls(publisher: Publisher, images: list[str], nodes: int, when: str) -> list[Sample]:
    samples = [timed_pull(publisher, image, nodes) for image in images]
    print(f"idle ({when}): {[round(s.seconds, 2) for s in samples]} s", flush=True)
    return samples


def measure(
    publisher: Publisher, workers: list[WorkerProcess], images: Images, slots: int
) -> Figures:
    nodes = len(workers)
    idle_before = idle_pulls(publisher, images.idle[0], nodes, "before")

    # Session lane: the session's pulls against the rest of one warm-up.
    warm = WarmUp(publisher, images.warm_a, workers)
    warm.start()
    priority = []
    try:
        for image in images.session:
            before = warm.wait_all_slots_busy(slots)
            sample = timed_pull(publisher, image, nodes)
            warm.other_answers += 1
            sample.queue_at_request, sample.queue_at_answer = before, warm.queue()
            priority.append(sample)
            print(
                f"session lane: {sample.seconds:.2f} s; warm-ups queued per node at the "
                f"request {_queued(before)}, at the answer {_queued(sample.queue_at_answer)}",
                flush=True,
            )
    finally:
        warm.join()
    print(f"warm-up of {len(images.warm_a)} images done in {warm.seconds:.1f} s", flush=True)
    idle_between = idle_pulls(publisher, images.idle[1], nodes, "the warm-up drained")

    # Warm lane: the session's image at the back of another warm-up (first come, first served).
    fifo_warm = WarmUp(publisher, images.warm_b, workers)
    fifo_warm.start()
    try:
        before = fifo_warm.wait_all_slots_busy(slots)
        started = time.perf_counter()
        behind = publisher.warm([images.fifo], nodes=[w.node for w in workers], timeout=3600)
        fifo = Sample(time.perf_counter() - started, {}, {}, queue_at_request=before)
        if not behind.ok:
            raise RuntimeError(f"the session image as a warm-up failed: {behind}")
        fifo_warm.other_answers += 1
    finally:
        fifo_warm.join()
    print(
        f"warm lane: {fifo.seconds:.2f} s; warm-ups queued per node at the request "
        f"{_queued(before)}",
        flush=True,
    )
    idle_after = idle_pulls(publisher, images.idle[2], nodes, "at the end")
    return Figures(
        idle_before,
        priority,
        idle_between,
        fifo,
        idle_after,
        {"session_lane_run": warm.seconds, "warm_lane_run": fifo_warm.seconds},
    )


def _queued(queue: dict[str, NodeQueue] | None) -> list[int]:
    return [q.queued for q in (queue or {}).values()]


def report(figures: Figures, setup: dict[str, object], args: argparse.Namespace) -> None:
    median = statistics.median
    before = median(Figures.seconds(figures.idle_before))
    between = median(Figures.seconds(figures.idle_between))
    after = median(Figures.seconds(figures.idle_after))
    # The baseline brackets the session lane: the idle pulls just before its warm-up and
    # just after it drained (on a shared machine the idle pull drifts during a run).
    idle = median(Figures.seconds(figures.idle_before + figures.idle_between))
    priority = median(Figures.seconds(figures.session_lane))
    fifo = figures.warm_lane.seconds
    queued = [n for s in figures.session_lane for n in _queued(s.queue_at_request)]
    fifo_queued = _queued(figures.warm_lane.queue_at_request)
    long_queue = min(queued) >= args.images // 2
    met = priority / idle <= GOAL
    size_mb = float(str(setup["size_mb"]))
    print_table(
        f"a session image ({size_mb:g} MB, {args.layers} layers) onto {args.nodes} nodes "
        f"behind a warm-up of {args.images} such images, {setup['slots']} slots a node; "
        f"median of {args.repeats} but the warm lane (once); x idle: against the median of "
        f"the idle pulls before and once drained (goal: session lane <= {GOAL}x idle)",
        ["case", "seconds", "x idle", "fewest warm-ups queued on a node at the request"],
        [
            ["idle, before", before, before / idle, "-"],
            ["session lane", priority, priority / idle, min(queued)],
            ["idle, warm-up drained", between, between / idle, "-"],
            ["idle (before and drained)", idle, 1.0, "-"],
            ["warm lane (FIFO, today)", fifo, fifo / idle, min(fifo_queued)],
            ["idle, at the end", after, after / idle, "-"],
        ],
    )
    print(
        f"\nsamples: idle before {_rounded(figures.idle_before)}, session lane "
        f"{_rounded(figures.session_lane)}, idle once drained {_rounded(figures.idle_between)}, "
        f"idle at the end {_rounded(figures.idle_after)}"
    )
    print(
        f"a whole warm-up of {args.images} images took "
        f"{figures.warm_up_seconds['session_lane_run']:.1f} s (with the session pulls in it); "
        f"{figures.warm_up_seconds['warm_lane_run']:.1f} s (with the session's image last)"
    )
    if not long_queue:
        print(f"WARNING: a session pull was made with fewer than {args.images // 2} queued")
    idles = [before, between, after]
    if max(idles) > 1.5 * min(idles):
        print("NOTE: the idle pull drifted by more than 1.5x during the run: a noisy machine")
    print(
        f"goal {'met' if met else 'NOT met'}: session lane {priority / idle:.2f}x idle "
        f"(goal <= {GOAL}x; {priority / before:.2f}x the idle pulls just before, "
        f"{priority / between:.2f}x those once the warm-up drained); "
        f"warm lane {fifo / idle:.1f}x idle"
    )
    if setup.get("disk_note"):
        print(setup["disk_note"])
    document = {
        **setup,
        "summary": {
            "idle_s": idle,
            "idle_before_s": before,
            "session_lane_s": priority,
            "warm_lane_s": fifo,
            "idle_drained_s": between,
            "idle_end_s": after,
            "session_lane_x_idle": priority / idle,
            "warm_lane_x_idle": fifo / idle,
            "goal_x_idle": GOAL,
            "goal_met": met,
            "queue_long_at_every_session_request": long_queue,
        },
        **asdict(figures),
    }
    print(f"\nfigures saved to {save('priority', document)}")


def _rounded(samples: list[Sample]) -> list[float]:
    return [round(s.seconds, 2) for s in samples]


if __name__ == "__main__":
    sys.exit(main())
