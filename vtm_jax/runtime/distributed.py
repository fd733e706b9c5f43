"""Joining the processes of a multi-host run (``jax.distributed``), before JAX touches a device."""

from __future__ import annotations

from vtm_jax.errors import UserError


def join_processes(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> None:
    """Join a multi-host run: explicitly (``coordinator`` ``HOST:PORT`` with the process count
    and this process's id), or ``auto`` (TPU pods and SLURM describe the cluster themselves).
    Neither: a single-process run, nothing to join. Bad arguments are a one-line UserError."""
    import jax

    if coordinator:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator needs --num-processes and --process-id")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--coordinator must be HOST:PORT, not {coordinator!r}")
        if num_processes < 1:
            raise UserError(f"--num-processes must be at least 1, not {num_processes}")
        if not 0 <= process_id < num_processes:
            raise UserError(
                f"--process-id must be in [0, {num_processes}) for --num-processes "
                f"{num_processes}, not {process_id}"
            )
        start = lambda: jax.distributed.initialize(  # noqa: E731
            coordinator, num_processes, process_id
        )
    elif num_processes is not None or process_id is not None:
        raise UserError("--num-processes and --process-id need --coordinator")
    elif auto:
        start = jax.distributed.initialize
    else:
        return
    try:
        start()
    except (RuntimeError, ValueError) as e:  # unreachable coordinator, undetected cluster
        where = coordinator or "the auto-detected cluster"
        raise UserError(f"cannot join the distributed run at {where}: {e}") from None
