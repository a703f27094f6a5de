"""``trimix eval --ray``: a run's items predicted by workers on a Ray cluster, written here.

Why this shape. Everything a prediction depends on besides the models stays where a local run does
it, in :func:`trimix_cpp.evaluation.pipeline.run_evaluation`: the checks, the locked run folder and its
manifest, the prompts fitted to the context (with the reference model's tokenizer, loaded here
vocabulary-only, which is cheap), the calibration sample, writing and scoring. Only the work that
needs the weights moves: each worker is a Ray actor that loads the models once and keeps them, and
predicts an item with :meth:`~trimix_cpp.evaluation.predict.Runner.item_records`, the very code a
local run predicts it with. So a cluster run and a local run give the same predictions by
construction (greedy; llama.cpp's results do not depend on which process runs them).

* Before its first item a worker hashes its model files (SHA-256, cached per file version, see
  :func:`~trimix_cpp.evaluation.folder.file_sha256`) and compares them with the run's manifest; a node
  with another file refuses, and the run stops with one line naming the node and the file.
* The driver is the only writer of the run folder: workers return records, the driver appends each
  new one and drops any it already has (Ray may run an item twice after a failure), so the folder
  resumes exactly like a local run's, and one progress bar counts the whole run.
* A worker that dies (its process killed, its node lost) loses only the items it held: they go back
  to the queue and another worker (or the same one, restarted by Ray) predicts them. An item that has
  taken down three workers stops the run with its id rather than killing the rest.
* Ctrl-C on the driver kills the workers; what was appended stays, and rerunning the command resumes.

Each worker holds at most two items at a time, so it starts the next item while the driver writes
the last one, and a dead worker costs at most two items' work.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import _llama
from ..calibrate import Calibration
from ..engine import Engine
from ..errors import TrimixError, flag
from ..fusion import ROLES
from ..loading import LoadOptions
from ..selection import Selector
from .folder import file_sha256
from .pipeline import BackendSpec, LocalBackend, OpenBackend, RunnerSettings
from .predict import MethodSpec, Runner, Task

NAMESPACE = "trimix"  # the Ray namespace of the workers (see worker_name)
IN_FLIGHT = 2  # items a worker holds at once
PROBE = "probe"  # a worker's concurrency group for pid(), apart from its items
MAX_RESTARTS = 2  # Ray restarts a dead worker this many times before the run does without it
MAX_ATTEMPTS = 3  # workers an item may take down before the run stops on it
LOCAL_OBJECT_STORE = 100 << 20  # a local instance's object store: records are small
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's services on 127.0.0.1 only

RAY_HELP = "pip install 'trimix[ray]'"


class ClusterError(TrimixError):
    """The cluster cannot run this evaluation: Ray is missing or unreachable, too few CPUs, a worker
    refuses its model files, or the workers keep dying."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide a cluster run is.

    ``address`` is an existing cluster (``HOST:PORT`` of its head, ``ray://HOST:PORT``, or ``auto``
    for the cluster this node joined with ``ray start``); None starts a local Ray instance on
    127.0.0.1 for this run and stops it after.
    ``workers`` actors each load the models once and use ``threads`` CPU threads (and reserve that
    many CPUs from Ray, so several workers on one node do not fight over cores).
    """

    address: str | None = None
    workers: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        for name, value in (("workers", self.workers), ("threads", self.threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterError(
                    "{param} must be a whole number, 1 or more, with {address}; got {got!r}", param=name, got=value
                )
        if self.address is not None and not self.address.strip():
            raise ClusterError(
                "{address} ADDRESS is empty: give HOST:PORT of the cluster's head, or leave it out", param="address"
            )


def cluster_options(address: str | None, workers: int | None, threads: int) -> ClusterOptions | None:
    """The ``--ray``/``--workers``/``--threads`` flags as options, or None for a local run.

    ``address`` is None without ``--ray`` and ``local`` for a local Ray instance. ``--workers``
    without ``--ray`` would be silently ignored, so it is an error. ``--threads 0`` (every core)
    means one thread per worker with ``--ray``: a worker reserves as many CPUs as it has threads.
    """
    if address is None:
        if workers is not None:
            raise ClusterError(
                "{workers} counts Ray workers: add {address} local (a local Ray instance) or {address} ADDRESS",
                param="workers",
            )
        return None
    return ClusterOptions(
        address=None if address == "local" else address,
        workers=2 if workers is None else workers,
        threads=threads or 1,
    )


def backend_for(address: str | None, workers: int | None, threads: int) -> OpenBackend:
    """Where ``trimix eval`` predicts items: here (no ``--ray``), or on Ray workers."""
    cluster = cluster_options(address, workers, threads)
    return LocalBackend if cluster is None else ray_backend(cluster)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError("{address} needs Ray: {help}", param="address", help=RAY_HELP) from None
    return ray


def node_name() -> str:
    """This machine as a person finds it in a cluster: host name and the address of its Ray node."""
    try:
        ray = _ray()
        here = ray.get_runtime_context().get_node_id()
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n.get("NodeID") == here), "")
    except Exception:  # outside Ray: the host name alone
        ip = ""
    host = socket.gethostname()
    return f"{host} ({ip})" if ip and ip != host else host


def check_model_files(paths: Mapping[str, str | Path], models: Mapping[str, Mapping[str, Any]], node: str) -> None:
    """Refuse, in one line naming the node and the file, when a model file here is not the one the
    run's manifest records (compared by SHA-256 of the whole file)."""
    for role, path in paths.items():
        want = models.get(role, {}).get("file_sha256")
        path = Path(path)
        if not path.is_file():
            raise ClusterError(
                f"worker on {node}: the {role} model {path} is not there; put the run's models on every node at "
                "the same path"
            )
        got = file_sha256(path)
        if got != want:
            raise ClusterError(
                f"worker on {node} refuses: its {role} model {path} has sha256 {got[:16]}..., the run's manifest "
                f"has {str(want)[:16]}...; copy the run's file to that path on this node"
            )


class Worker:
    """One Ray actor's state: the run's models, loaded once, checked before the first item.

    Every call answers ``("ok", value)``, or ``("refused" | "error", one line)`` for a worker that
    refuses its files or an item that fails the way it would fail a local run; a dead process shows
    on the driver as Ray's actor error.
    """

    def __init__(
        self, paths: Mapping[str, str], options: LoadOptions, models: Mapping[str, dict], settings: RunnerSettings
    ) -> None:
        self.paths = dict(paths)
        self.options = options
        self.models = dict(models)
        self.settings = settings
        self.node = node_name()
        self.runner: Runner | None = None

    def _ready(self) -> Runner:
        if self.runner is None:
            check_model_files(self.paths, self.models, self.node)
            self.runner = self.settings.runner(Engine(self.paths, self.options), None)
        return self.runner

    def start(self) -> tuple[str, Any]:
        """Check the files and load the models; answers where this worker is and its context."""
        try:
            runner = self._ready()
        # the answers go back to the `trimix eval` that started the run, so they name its flags
        except ClusterError as e:
            return "refused", e.render(flag)
        except TrimixError as e:
            return "error", f"worker on {self.node}: {e.render(flag)}"
        assert runner.engine is not None
        return "ok", {"node": self.node, "pid": os.getpid(), "n_ctx": runner.engine.n_ctx}

    def predict(self, task: str, item: Any, methods: Sequence[MethodSpec]) -> tuple[str, Any]:
        """One item's records under ``methods`` (see :meth:`Runner.item_records`)."""
        try:
            runner = self._ready()
        except ClusterError as e:
            return "refused", e.render(flag)
        try:
            return "ok", runner.item_records(Task(task, ()), item, methods)
        except TrimixError as e:
            return "error", e.render(flag)

    def calibrate(self, prompts: Sequence[str], selectors: Sequence[Selector]) -> tuple[str, Any]:
        """A task's calibration over ``prompts`` (see :meth:`Runner.calibrate_prompts`)."""
        try:
            runner = self._ready()
        except ClusterError as e:
            return "refused", e.render(flag)
        try:
            return "ok", runner.calibrate_prompts(prompts, selectors)
        except TrimixError as e:
            return "error", e.render(flag)

    def pid(self) -> int:
        """This worker's process id; call it in the ``probe`` concurrency group to get an answer while
        an item runs (the driver uses it to learn whether Ray restarted a dead worker)."""
        return os.getpid()


def worker_name(k: int, pid: int | None = None) -> str:
    """The Ray name of a driver's worker ``k`` (in namespace ``trimix``), to find it with ``ray.get_actor``."""
    return f"trimix-eval-{socket.gethostname()}-{os.getpid() if pid is None else pid}-{k}"


def _reference(paths: Mapping[str, Path]) -> Path:
    """The file whose tokenizer makes a run's token ids (as :class:`Engine` picks it)."""
    ordered = [r for r in ROLES if r in paths]
    return Path(paths["large_ins"] if "large_ins" in paths else paths[ordered[0]])


class RayBackend:
    """Items predicted by ``cluster.workers`` Ray actors; the driver (this process) writes.

    Opened by :func:`run_evaluation` once the run folder is locked and its manifest saved (see
    :func:`ray_backend`).
    """

    engine = None

    def __init__(self, spec: BackendSpec, cluster: ClusterOptions) -> None:
        self.cluster = cluster
        self.report = spec.report
        self.actors: list[Any] = []
        self.nodes: list[str] = []
        if cluster.address is None:
            # A local instance is for this run alone: Ray advertises and binds 127.0.0.1 instead of the
            # machine's network address (Ray reads this when it is first imported).
            os.environ.setdefault(LOOPBACK_ENV, "0")
        self._ray = _ray()
        self._own_init = False
        self._tokenizer: _llama.LlamaModel | None = None
        try:
            self._connect()
            self._spawn(replace(spec, options=replace(spec.options, n_threads=cluster.threads)))
            ref = _reference(spec.paths)
            _llama.check_gguf_file(ref)
            self._tokenizer = _llama.LlamaModel(ref, vocab_only=True)
        except BaseException:
            self.close()
            raise
        self._alive = [True] * len(self.actors)
        self.calibrator = self._calibrate
        self.lost = 0  # items requeued after their worker died
        self.duplicates = 0  # records dropped because the folder already had them

    # -- opening ------------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray, c = self._ray, self.cluster
        need = c.workers * c.threads
        if not ray.is_initialized():
            quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "namespace": NAMESPACE}
            try:
                if c.address is None:
                    ray.init(
                        num_cpus=need,
                        include_dashboard=False,
                        object_store_memory=LOCAL_OBJECT_STORE,
                        **quiet,
                    )
                else:
                    _reachable(c.address)
                    ray.init(address=c.address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {c.address}" if c.address else "a local Ray instance"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ClusterError(
                    f"cannot reach {where} ({first}); start it with `ray start --head` and give its address"
                ) from None
            self._own_init = True
        have = ray.cluster_resources().get("CPU", 0)
        if have < need:
            raise ClusterError(
                "the Ray cluster has {have:g} CPUs; {workers} {n_workers} x {threads} {n_threads} needs {need}: "
                "lower {workers} or {threads}, or add nodes",
                param="workers",
                have=have,
                n_workers=c.workers,
                n_threads=c.threads,
                need=need,
            )

    def _spawn(self, spec: BackendSpec) -> None:
        ray, c = self._ray, self.cluster
        actor = ray.remote(concurrency_groups={PROBE: 1})(Worker)  # pid() answers while an item runs
        strpaths = {r: str(Path(p).resolve()) for r, p in spec.paths.items()}
        for k in range(c.workers):
            self.actors.append(
                actor.options(
                    name=worker_name(k),
                    namespace=NAMESPACE,
                    num_cpus=c.threads,
                    max_restarts=MAX_RESTARTS,
                    max_task_retries=0,  # the driver reschedules lost items itself (and drops duplicates)
                ).remote(strpaths, spec.options, dict(spec.models), spec.settings)
            )
        try:
            answers = self._wait_all([a.start.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            raise ClusterError(f"a Ray worker died while loading the models: {_first_line(e)}") from None
        contexts = set()
        for status, value in answers:
            if status != "ok":
                raise ClusterError(value)
            self.nodes.append(value["node"])
            contexts.add(value["n_ctx"])
        self.n_ctx = min(contexts)

    def _wait_all(self, refs: list[Any]) -> list[Any]:
        """Ray's answers to ``refs``, waiting in short steps so that Ctrl-C gets through."""
        ray = self._ray
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        return ray.get(refs)

    def count_tokens(self, text: str) -> int:
        assert self._tokenizer is not None
        return len(self._tokenizer.tokenize(text, add_bos=self._tokenizer.add_bos))

    # -- calibration --------------------------------------------------------------------------------

    def _calibrate(self, prompts: Sequence[str], selectors: Sequence[Selector]) -> dict[str, Calibration]:
        """A task's calibration, computed by a worker that stays alive through it (a worker that dies
        is replaced by the next live one, or by itself once Ray has restarted it)."""
        ray = self._ray
        for _ in range(MAX_ATTEMPTS):
            k = next((k for k, alive in enumerate(self._alive) if alive), None)
            if k is None:
                break
            try:
                status, value = self._wait_all([self.actors[k].calibrate.remote(list(prompts), list(selectors))])[0]
            except ray.exceptions.RayActorError:
                self._alive[k] = self._probe(k)
                continue
            if status != "ok":
                raise ClusterError(value) if status == "refused" else TrimixError(value)
            return value
        raise ClusterError("the Ray workers kept dying during the task's calibration (rerun to resume)")

    # -- items --------------------------------------------------------------------------------------

    def run(self, runner: Runner, task: Task, methods: Sequence[MethodSpec]) -> Iterator[dict]:
        """Predict every pending (item, method) of ``task`` on the workers; append each new record
        to ``runner.log`` (dropping any it already holds) and yield it."""
        ray = self._ray
        log = runner.log
        queue = deque(i for i, it in enumerate(task.items) if runner.todo(task, it, methods))
        attempts = [0] * len(task.items)
        held: dict[Any, tuple[int, int]] = {}  # object ref -> (worker, item index)
        while queue or held:
            for k, actor in enumerate(self.actors):
                while self._alive[k] and queue and sum(1 for w, _ in held.values() if w == k) < IN_FLIGHT:
                    i = queue.popleft()
                    todo = runner.todo(task, task.items[i], methods)
                    if todo:
                        held[actor.predict.remote(task.name, task.items[i], todo)] = (k, i)
            if not held:
                raise ClusterError(
                    f"every Ray worker died; {len(queue)} items of {task.name} are left (rerun the command to resume)"
                )
            ready, _ = ray.wait(list(held), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref not in held:
                    continue  # held by a worker that died meanwhile: its item is queued again
                k, i = held.pop(ref)
                try:
                    status, value = ray.get(ref)
                except ray.exceptions.RayActorError:
                    self._lost(k, i, task, attempts, queue, held)
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise ClusterError(
                        f"a worker failed on item {task.items[i].id} of {task.name}: {_first_line(e)}"
                    ) from None
                if status == "refused":
                    raise ClusterError(value)
                if status == "error":
                    raise TrimixError(value)
                for rec in value:
                    if log.done(rec["task"], rec["id"], rec["method"]):
                        self.duplicates += 1
                        continue
                    log.append(rec)
                    yield rec

    def _lost(self, k: int, i: int, task: Task, attempts: list[int], queue: deque, held: dict) -> None:
        """Worker ``k`` died holding item ``i`` (and perhaps another): they go back to the front of
        the queue, and the worker is used again only if Ray restarted it."""
        mine = [i]
        for ref, (w, j) in list(held.items()):
            if w == k:
                del held[ref]
                mine.append(j)
        for j in mine:
            self.lost += 1
            attempts[j] += 1
            if attempts[j] >= MAX_ATTEMPTS:
                raise ClusterError(
                    "item {item} of {task} was lost with its worker {n} times: it may "
                    "crash the worker (run it without {address} to see), or the nodes keep failing",
                    param="address",
                    item=task.items[j].id,
                    task=task.name,
                    n=attempts[j],
                )
        queue.extendleft(reversed(sorted(mine)))
        self._alive[k] = self._probe(k)
        if self.report is not None:
            then = "Ray restarted it" if self._alive[k] else "the run goes on without it"
            self.report.warning(
                f"worker {k} on {self.nodes[k]} died holding {len(mine)} item(s) of {task.name}: they run again "
                f"({then})"
            )

    def _probe(self, k: int, restart_s: float = 120.0, dead_s: float = 15.0) -> bool:
        """Whether worker ``k`` answers again (Ray restarts a dead actor up to MAX_RESTARTS times).

        A call made before Ray has seen the death fails like one to an actor gone for good, so the
        question is asked again: the worker counts as gone after ``dead_s`` of such answers, or when
        it has not answered within ``restart_s`` (a restart that never finishes).
        """
        ray = self._ray
        end = time.monotonic() + restart_s
        dead_since: float | None = None
        while time.monotonic() < end:
            ref = self.actors[k].pid.options(concurrency_group=PROBE).remote()
            while True:
                ready, _ = ray.wait([ref], timeout=1.0)
                if ready or time.monotonic() >= end:
                    break
            if not ready:
                return False
            try:
                ray.get(ref)
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                dead_since = None
            except ray.exceptions.RayActorError:
                now = time.monotonic()
                dead_since = now if dead_since is None else dead_since
                if now - dead_since >= dead_s:
                    return False
            time.sleep(0.5)
        return False

    # -- closing ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (their processes end, whatever they hold) and leave Ray."""
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self._tokenizer is not None:
            self._tokenizer.close()
            self._tokenizer = None
        if self._own_init and ray.is_initialized():
            ray.shutdown()
            self._own_init = False


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A one-line error when nothing answers at ``HOST:PORT`` (Ray itself would wait on it for minutes)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ClusterError(
            "{address} {given}: give HOST:PORT of the cluster's head (or ray://HOST:PORT, auto, local)",
            param="address",
            given=address,
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            "nothing answers at {address} {given} ({why}): start the cluster with `ray start --head` on "
            "that node, or check the address it printed",
            param="address",
            given=address,
            why=e.strerror or e,
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def ray_backend(cluster: ClusterOptions) -> OpenBackend:
    """The ``backend`` argument of :func:`~trimix_cpp.evaluation.pipeline.run_evaluation` for a cluster run."""

    def open_backend(spec: BackendSpec) -> RayBackend:
        return RayBackend(spec, cluster)

    return open_backend


__all__ = [
    "ClusterError",
    "ClusterOptions",
    "RayBackend",
    "Worker",
    "backend_for",
    "check_model_files",
    "cluster_options",
    "ray_backend",
    "worker_name",
]
