"""Tensor parallelism across the GPUs of one host (``EngineConfig.tp`` / ``--tp N``).

Rank 0 is the engine's own process: it runs the scheduler. Ranks ``1..tp-1`` are worker processes it starts
with ``torch.multiprocessing`` (spawn). Every rank loads the model, keeps its shard
(:func:`lmkiln.models.tensor_parallel.shard_model`) and builds an ordinary :class:`ModelRunner` over it, with
a KV cache for its own KV heads. Each step rank 0 sends the :class:`SchedulerOutput` to the workers (over a
pipe, compactly: every sequence's new tokens once) and all ranks run ``ModelRunner.execute`` on it; the
collectives inside the model (one all-reduce after o_proj and after down_proj, the vocab-parallel embedding
and lm_head) keep them in lockstep, so CUDA graphs captured by each runner replay the NCCL calls too. Every
rank computes the same full logits; rank 0's sampled tokens are the step's result.

Process hygiene: the workers exit when rank 0 sends them the exit message (:meth:`shutdown`, also run at
interpreter exit), when their pipe from rank 0 closes, or when their parent process disappears (a watchdog
thread), so a killed server leaves no orphans. GPUs are ``cuda:0 .. cuda:tp-1`` of the visible ones (choose
them with ``CUDA_VISIBLE_DEVICES``); NCCL's NVLink SHARP / multicast (NVLS) stays off. ``device="cpu"`` runs
the ranks on the CPU with gloo (for tests).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import importlib
import logging
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lmkiln.engine.config import EngineConfig
from lmkiln.engine.errors import CacheMemoryError, EngineConfigError
from lmkiln.engine.loader import LoadedModel, artifact_kind, load_model, resolve_dtype, resolve_int4
from lmkiln.engine.model_runner import ModelRunner, plan_num_blocks
from lmkiln.engine.outputs import ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from lmkiln.engine.sequence import Sequence
from lmkiln.errors import LmkilnError
from lmkiln.models.config import ModelConfig
from lmkiln.models.tensor_parallel import TPGroup, check_tp, shard_model

log = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # a collective (or the rendezvous) waiting longer fails
STEP, EXIT = b"S", b"X"


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank exited or was shut down; the engine cannot continue (restart it)."""


class ShardBuilder(Protocol):
    """How each rank gets its shard: ``model_config`` (read by rank 0 before starting workers, to check
    the split) and ``__call__`` (run on every rank) returning the rank's :class:`LoadedModel`, whose
    ``config`` is the rank's view (:func:`shard_model`'s return value)."""

    def model_config(self, config: EngineConfig) -> ModelConfig: ...

    def __call__(self, config: EngineConfig, comm: TPGroup, device: torch.device) -> LoadedModel: ...


def read_model_config(model_dir: Any) -> ModelConfig:
    from lmkiln.models.internlm2 import internlm2_config, is_internlm2

    if is_internlm2(model_dir):
        return internlm2_config(model_dir)
    return ModelConfig.from_dir(model_dir)


def shard_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (a tied tensor counted once)."""
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


class CheckpointShards:
    """The default :class:`ShardBuilder`: each rank loads the model directory (HF, AWQ or packed) on the
    CPU, keeps its shard and moves it to its device; only rank 0 checks the artifact's sha256."""

    def model_config(self, config: EngineConfig) -> ModelConfig:
        return read_model_config(config.model_dir)

    def __call__(self, config: EngineConfig, comm: TPGroup, device: torch.device) -> LoadedModel:
        cfg = self.model_config(config)
        dtype = resolve_dtype(config.dtype, cfg, device)
        int4 = resolve_int4(None, artifact_kind(config.model_dir), device, dtype)  # as load_model decides
        verify = config.verify_artifact and comm.rank == 0
        with torch.no_grad():
            loaded = load_model(
                config.model_dir, torch.device("cpu"), dtype, verify=verify, int4="on" if int4 else "off"
            )
            local = shard_model(loaded.model, loaded.config, comm)
            model = loaded.model.to(device)
        return LoadedModel(model, local, loaded.kind, dtype, device, shard_bytes(model), int4)


def tp_devices(device: str, tp: int) -> list[torch.device]:
    """The device of every rank: ``cuda:0 .. cuda:tp-1``, or the CPU for all (``device="cpu"``)."""
    if device == "cpu":
        return [torch.device("cpu")] * tp
    if device not in ("auto", "cuda"):
        raise EngineConfigError(
            f"--tp {tp} runs rank r on cuda:r; pass --device cuda (or auto), not {device!r}, and choose the "
            "GPUs with CUDA_VISIBLE_DEVICES (--device cpu runs the ranks on the CPU, for testing)"
        )
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < tp:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise EngineConfigError(
            f"--tp {tp} needs {tp} GPUs on this host but {n} {'is' if n == 1 else 'are'} visible{where}; "
            f"lower --tp to {max(n, 1)} or run on a host with {tp} GPUs"
        )
    return [torch.device("cuda", r) for r in range(tp)]


# --------------------------------------------------------------------------------------- step messages


class StepEncoder:
    """Rank 0's half of the step message: a :class:`SchedulerOutput` whose sequences carry only the
    tokens the workers have not seen yet (token ids only ever grow), plus their other fields."""

    def __init__(self) -> None:
        self._sent: dict[int, int] = {}  # seq_id -> tokens already sent

    def encode(self, out: SchedulerOutput) -> bytes:
        for seq_id in out.finished_seq_ids:
            self._sent.pop(seq_id, None)
        items = []
        for item in out.scheduled:
            seq = item.seq
            sent = self._sent.get(seq.seq_id, 0)
            state = {k: v for k, v in vars(seq).items() if k != "token_ids"}
            fields = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name != "seq"}
            items.append((state, sent, seq.token_ids[sent:], fields))
            self._sent[seq.seq_id] = seq.num_tokens
        rest = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.name != "scheduled"}
        return pickle.dumps((items, rest), protocol=pickle.HIGHEST_PROTOCOL)


class StepDecoder:
    """A worker's half: keeps a mirror of every live sequence and rebuilds the :class:`SchedulerOutput`."""

    def __init__(self) -> None:
        self.seqs: dict[int, Sequence] = {}

    def decode(self, data: bytes) -> SchedulerOutput:
        items, rest = pickle.loads(data)
        for seq_id in rest["finished_seq_ids"]:
            self.seqs.pop(seq_id, None)
        scheduled = []
        for state, sent, new_tokens, fields in items:
            seq = self.seqs.get(state["seq_id"])
            if seq is None:
                seq = self.seqs[state["seq_id"]] = Sequence.__new__(Sequence)
                seq.token_ids = []
            if len(seq.token_ids) != sent:
                raise WorkerDiedError(
                    f"step message out of sync for sequence {state['seq_id']}: the worker holds "
                    f"{len(seq.token_ids)} tokens, rank 0 assumed {sent}"
                )
            seq.token_ids.extend(new_tokens)
            vars(seq).update(state)
            scheduled.append(ScheduledSequence(seq=seq, **fields))
        return SchedulerOutput(scheduled=scheduled, **rest)


# --------------------------------------------------------------------------------------------- ranks


class _PeerFailedError(Exception):
    """Another rank reported an error in a phase all ranks run together."""


def _init_group(backend: str, store: Any, rank: int, world: int, device: torch.device) -> None:
    kw: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=GROUP_TIMEOUT, **kw)
    warm = torch.ones(1, device=device)  # NCCL communicators are set up now, never inside a graph capture
    dist.all_reduce(warm)
    if warm.item() != world:
        raise WorkerDiedError(f"the first all-reduce over {world} ranks gave {warm.item()}")


def _plan_blocks(config: EngineConfig, loaded: LoadedModel, session_len: int) -> int:
    """KV blocks for every rank: each plans for its own device, then all take the smallest count."""
    err: CacheMemoryError | None = None
    try:
        num = plan_num_blocks(config, loaded, session_len)
    except CacheMemoryError as e:
        num, err = -1, e
    t = torch.tensor([num], dtype=torch.int64, device=loaded.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    if err is not None:
        raise err
    if t.item() < 0:
        raise _PeerFailedError
    return int(t.item())


def _describe(e: BaseException) -> tuple[str, str, str, str]:
    return type(e).__module__, type(e).__qualname__, str(e), traceback.format_exc()


def _rebuild_error(rank: int, info: tuple[str, str, str, str]) -> Exception:
    """A worker's error as rank 0 raises it: the same class for lmkiln's user errors, else with traceback."""
    module, name, msg, tb = info
    if module.startswith("lmkiln."):
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, LmkilnError):
            return cls(f"tensor-parallel rank {rank}: {msg}")
    return WorkerDiedError(f"tensor-parallel rank {rank} failed: {name}: {msg}\n{tb}")


def _exit_with_parent(parent_pid: int) -> None:
    """Exit this worker as soon as its parent is gone, even while it waits inside a collective."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="lmkiln-tp-watchdog", daemon=True).start()


def _worker(
    rank: int,
    config: EngineConfig,
    builder: ShardBuilder,
    port: int,
    backend: str,
    device: torch.device,
    step_conn: Any,
    status_conn: Any,
    parent_pid: int,
    log_level: int,
) -> None:
    """Ranks 1..tp-1: load the shard, join the group, build the runner, then run the steps rank 0 sends."""
    world = config.tp
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops the workers
    _exit_with_parent(parent_pid)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        loaded = builder(config, TPGroup(rank, world), device)
        status_conn.send(("ready", None))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=GROUP_TIMEOUT)
        _init_group(backend, store, rank, world, device)
        session_len = config.session_len or loaded.config.max_position_embeddings
        runner = ModelRunner(loaded, _plan_blocks(config, loaded, session_len), config)
        status_conn.send(("running", None))
        decoder = StepDecoder()
        while True:
            try:
                msg = step_conn.recv_bytes()
            except EOFError:  # rank 0 is gone
                break
            if msg[:1] == EXIT:
                break
            runner.execute(decoder.decode(msg[1:]))
    except _PeerFailedError:
        pass
    except BaseException as e:
        with contextlib.suppress(OSError):
            status_conn.send(("error", _describe(e)))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ParallelModelRunner:
    """A :class:`ModelRunner` over ``config.tp`` ranks (same ``execute``), plus :meth:`shutdown`.

    Starts the workers, loads rank 0's shard in this process, and plans one KV block count for all ranks
    (``num_blocks``: the smallest any rank can hold). ``loaded`` is rank 0's model with the *full* model
    config (what the engine validates requests against); attributes it lacks come from rank 0's runner.
    """

    def __init__(self, config: EngineConfig, builder: ShardBuilder | None = None) -> None:
        self.config = config
        self.world = world = config.tp
        self._procs: list[Any] = []
        self._step_conns: list[Any] = []
        self._status_conns: list[Any] = []
        self._closed = False
        self._owns_group = False
        builder = builder or CheckpointShards()
        cfg = builder.model_config(config)
        check_tp(cfg, world)
        devices = tp_devices(str(config.device), world)
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        if dist.is_initialized():
            raise EngineConfigError(
                "this process already has a torch.distributed process group; a tensor-parallel engine "
                "starts its own (one per process): shut the other engine down first"
            )
        self.session_len = config.session_len or cfg.max_position_embeddings
        atexit.register(self.shutdown)
        try:
            if backend == "nccl":
                torch.cuda.set_device(devices[0])
                os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast; workers inherit it
            store = dist.TCPStore(
                "127.0.0.1", 0, world, is_master=True, timeout=GROUP_TIMEOUT, wait_for_workers=False
            )
            self._spawn(config, builder, store.port, backend, devices)
            t0 = time.perf_counter()
            local = builder(config, TPGroup(0, world), devices[0])
            self._wait("ready")
            log.info("tp=%d: every rank loaded its shard (%.1f s)", world, time.perf_counter() - t0)
            _init_group(backend, store, 0, world, devices[0])
            self._owns_group = True
            try:
                self.num_blocks = _plan_blocks(config, local, self.session_len)
            except _PeerFailedError:
                self._wait("running")  # raises the worker's error
                raise
            self.runner = ModelRunner(local, self.num_blocks, config)
            self._wait("running")
        except BaseException:
            self.shutdown()
            raise
        self.loaded = dataclasses.replace(local, config=cfg)
        self._encoder = StepEncoder()
        log.info(
            "tensor parallel: %d ranks (%s), %.2f GiB of weights and %d KV blocks per rank",
            world,
            backend,
            local.weight_bytes / (1 << 30),
            self.num_blocks,
        )

    def _spawn(
        self,
        config: EngineConfig,
        builder: ShardBuilder,
        port: int,
        backend: str,
        devices: list[torch.device],
    ) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        level = logging.getLogger("lmkiln").getEffectiveLevel()
        for rank in range(1, self.world):
            step_r, step_w = ctx.Pipe(duplex=False)
            status_r, status_w = ctx.Pipe(duplex=False)
            args = (rank, config, builder, port, backend, devices[rank], step_r, status_w, os.getpid(), level)
            proc = ctx.Process(target=_worker, args=args, name=f"lmkiln-tp{rank}", daemon=True)
            proc.start()
            step_r.close()
            status_w.close()
            self._procs.append(proc)
            self._step_conns.append(step_w)
            self._status_conns.append(status_r)

    def _wait(self, phase: str) -> None:
        """Block until every worker reports ``phase``; raise the first error a worker reports or its death."""
        for rank, (proc, conn) in enumerate(zip(self._procs, self._status_conns, strict=True), start=1):
            while True:
                if conn.poll(0.2):
                    try:
                        kind, info = conn.recv()
                    except EOFError:
                        raise self._died(rank, proc, f"before it was {phase}") from None
                    if kind == "error":
                        raise _rebuild_error(rank, info)
                    if kind == phase:
                        break
                elif not proc.is_alive():
                    raise self._died(rank, proc, f"before it was {phase}")

    def _died(self, rank: int, proc: Any, when: str) -> Exception:
        """The error to raise for a worker that exited: the one it reported, else its exit code."""
        proc.join(1)
        conn = self._status_conns[rank - 1]
        with contextlib.suppress(OSError, EOFError):
            while conn.poll():
                kind, info = conn.recv()
                if kind == "error":
                    return _rebuild_error(rank, info)
        return WorkerDiedError(
            f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} {when}; its log "
            "above says why; restart the engine"
        )

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        if self._closed:
            raise WorkerDiedError("the tensor-parallel engine was shut down")
        dead = self._dead_worker(0.0)
        if dead is not None:
            self.shutdown()
            raise dead
        msg = STEP + self._encoder.encode(out)
        try:
            for conn in self._step_conns:
                conn.send_bytes(msg)
            return self.runner.execute(out)
        except BaseException as e:  # the workers may be inside this step's collectives: the group is unusable
            dead = self._dead_worker(1.0)  # a collective fails when a peer dies: report the death
            self.shutdown(timeout=2.0)
            if dead is not None and isinstance(e, Exception):
                raise dead from e
            raise

    def _dead_worker(self, wait: float) -> Exception | None:
        """The error of the first worker that exited (waiting up to ``wait`` s for one), else None."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self._procs, start=1):
                if not proc.is_alive():
                    return self._died(rank, proc, "while serving")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (exit message, then SIGTERM, then SIGKILL) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        for conn in self._step_conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(EXIT)
            conn.close()
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("tensor-parallel worker %s did not exit; terminating it", proc.pid)
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._status_conns:
            conn.close()
        self.__dict__.pop("runner", None)  # rank 0's weights and KV cache
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def __getattr__(self, name: str) -> Any:  # kv_cache, sampler, ... of rank 0's runner
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

