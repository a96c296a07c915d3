"""The Ray Data pipeline of `ict score|index --ray`: list -> CPU crop tasks -> Scorer actors -> Parquet.

    from_arrow([index, path] blocks)             # the inputs without a row in OUT
      .map_batches(prepare)                      # CPU tasks: read, sha256, decode, crop
      .map_batches(ScoreActor, concurrency=N,    # one Scorer per actor: 1 GPU each, or CPU threads
                   num_gpus=1 | 0)
      .write_parquet(OUT)                        # files appear as batches finish

Ray restarts a dead actor and retries its batch (Ray Data's defaults for actor pools), so a batch
is written once or not at all; a re-run skips the inputs that already have a row in OUT.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from . import INSTALL_HINT, output

log = logging.getLogger(__name__)


@dataclass
class Job:
    command: str                      # "score" | "index"
    paths: list[str]                  # absolute paths or URIs, in input order
    out: Path
    ict: str
    hp: str | None
    prompt: str | None = None
    device: str = "auto"
    precision: str = "auto"
    config: str | None = None
    actors: int | None = None         # default: one per GPU of the cluster, else 1 (scale.cli checks >= 1)
    batch_size: int | None = None     # default: 32 on GPUs, 8 on CPUs (the Scorer's chunk; checked >= 1)
    quiet: bool = False
    manifest: dict = field(default_factory=dict)


@dataclass
class Summary:
    new_rows: int
    new_errors: int
    skipped: int
    rows: int
    actors: int
    device: str


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:  # absent, or present but unusable (e.g. its pyarrow needs another numpy)
        why = "is not installed" if isinstance(e, ModuleNotFoundError) else f"cannot be imported ({e})"
        raise InputError(f"--ray needs Ray, which {why}: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None) -> bool:
    """Start a local Ray (address None) or join a cluster ("auto", "ray://HOST:PORT", "HOST:PORT").
    Returns whether this call started the session (and so must shut it down). A session the caller
    already opened (a test, a notebook) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    import ict_core

    pkg = os.path.dirname(os.path.abspath(ict_core.__file__))
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address is None:  # workers of a local Ray import ict_core from this checkout, as the driver does
        path = os.pathsep.join(p for p in (os.path.dirname(pkg), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}}, **common)
    else:  # ship this ict_core to the cluster, so its workers run the same code as the driver
        ray.init(address=address, runtime_env={"py_modules": [pkg]}, **common)
    return True


def _layout(ray, job: Job) -> tuple[bool, int, int, float, int]:
    """(use GPUs, actors, batch size, CPUs per actor, torch threads per CPU actor) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if job.device.startswith("cuda") and not gpus:
        raise InputError("--device cuda asked for, but the Ray cluster has no GPU; use --device cpu or auto")
    use_gpu = job.device != "cpu" and gpus > 0
    actors = job.actors if job.actors is not None else (gpus if use_gpu else 1)
    if use_gpu and actors > gpus:
        raise InputError(f"--actors {actors} asks for more GPU actors than the cluster's {gpus} GPU(s)")
    batch = job.batch_size if job.batch_size is not None else (32 if use_gpu else 8)
    # CPU actors leave at least one CPU to the crop and write tasks, or the pipeline would stall
    per_actor = 1.0 if use_gpu else max(0.1, min(1.0, (cpus - 1) / actors))
    node_cpus = min((n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")), default=cpus)
    threads = max(1, int(node_cpus) // actors)
    return use_gpu, actors, batch, per_actor, threads


def file_names(ray, run_id: str):
    """A Ray FilenameProvider naming every file `ict-rows-<write>_<task>[_<block>].parquet`: the folder's own
    files are told from anything else by name (Ray >= 2.50 asks per task with its write id, older Ray per
    block, with this run's id)."""
    from ray.data.datasource import FilenameProvider

    class RowFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid, task_index):
            return f"{output.ROWS_PREFIX}{write_uuid}_{task_index:06}.parquet"

        def get_filename_for_block(self, block, *ids):  # (task_index, block_index), after write_uuid on 2.50+
            return f"{output.ROWS_PREFIX}{run_id}_{ids[-2]:06}_{ids[-1]:06}.parquet"

    return RowFiles()


def run(job: Job, address: str | None) -> Summary:
    """Run the job to the end; inputs that already have a row in job.out are not done again."""
    import uuid

    pa = output.need_pyarrow()
    ray = import_ray()
    output.check_out(job.out, job.manifest)
    done, rows_before, errors_before = output.done_rows(job.out)
    todo = [i for i in range(len(job.paths)) if i not in done]
    started = connect(address)
    try:
        from . import stages

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not job.quiet
        if not logging.getLogger("ict_core").isEnabledFor(logging.INFO):  # Ray Data's INFO lines need -v
            logging.getLogger("ray.data").setLevel(logging.ERROR if job.quiet else logging.WARNING)
        use_gpu, actors, batch, per_actor, threads = _layout(ray, job)
        log.info("%s %d image(s) with %d %s actor(s), batches of %d; %d row(s) already in %s",
                 job.command, len(todo), actors, "GPU" if use_gpu else "CPU", batch, rows_before, job.out)
        if todo:
            _pipeline(ray, pa, stages, job, todo, use_gpu, actors, batch, per_actor, threads, uuid.uuid4().hex[:12])
    finally:
        if started:
            ray.shutdown()
    _, rows_after, errors_after = output.done_rows(job.out)
    new = rows_after - rows_before
    return Summary(new, errors_after - errors_before, len(done), rows_after, actors, "GPU" if use_gpu else "CPU")


def _pipeline(ray, pa, stages, job: Job, todo: list[int], use_gpu, actors, batch, per_actor, threads, run_id):
    # paths travel as bytes: a file name that is not UTF-8 is no Arrow string (stages.prepare decodes it)
    table = pa.table({"index": pa.array(todo, pa.int64()),
                      "path": pa.array([os.fsencode(job.paths[i]) for i in todo], pa.binary())})
    block = batch * max(1, -(-table.num_rows // (2000 * batch)))  # about 2,000 blocks at most
    ds = ray.data.from_arrow([table.slice(s, block) for s in range(0, table.num_rows, block)])
    # A task pool of another size than the actor pool: Ray Data then keeps the crop tasks out of
    # the actors (it fuses equal pools), so decoding overlaps scoring instead of delaying it
    tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ds.map_batches(stages.prepare, batch_size=batch, batch_format="numpy", num_cpus=1,
                        compute=ray.data.TaskPoolStrategy(size=tasks if tasks != actors else tasks + 1))
    ds = ds.map_batches(stages.ScoreActor, batch_size=batch, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0, num_cpus=per_actor,
                        fn_constructor_kwargs=dict(command=job.command, ict=job.ict, hp=job.hp,
                                                   prompt=job.prompt, device="cuda" if use_gpu else "cpu",
                                                   precision=job.precision, config=job.config,
                                                   threads=None if use_gpu else threads))
    # files of ~4,096 rows on GPUs (~17 MB of index rows, a few seconds of one GPU's work: what a
    # killed job can lose), smaller on CPUs where a batch takes minutes
    ds.write_parquet(str(job.out), min_rows_per_file=4096 if use_gpu else batch * 2,
                     filename_provider=file_names(ray, run_id))
