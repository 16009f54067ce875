"""Rules for the site values that are rendered into job scripts, so that no config can inject a line.

Everything under `cluster` that reaches a script (an `#SBATCH` line, an `export`, the srun or apptainer
command) is checked here: env names are shell identifiers, no value holds a control character (a newline
ends an `#SBATCH` block and sbatch silently drops every directive after it), and `sbatch_extra` may only
name sbatch options that gptoss_hpc does not set itself. Rendering (gptoss_hpc.submission.sbatch) also
shell-quotes every value; these checks make a hostile value fail `validate` with its key instead.
"""

from __future__ import annotations

import re

from gptoss_hpc.config.schema import RunConfig

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_KEY_RE = re.compile(r"^[a-z][a-z0-9-]*$")

# sbatch options gptoss_hpc sets (or relies on being unset), with where the value comes from instead.
# sbatch accepts any unambiguous prefix of a long option (`--dep=` is --dependency), so keys are matched
# against an allow-list below, and this table only makes the refusal say why.
OWNED_SBATCH = {
    "job-name": "the launcher names jobs gptoss-<name>-<stage>; set `name`",
    "output": "submitit's log paths; logs go to <run dir>/slurm/<stage>/",
    "error": "submitit's log paths; logs go to <run dir>/slurm/<stage>/",
    "open-mode": "submitit appends to the logs across requeues",
    "array": "sweeps become arrays; cap them with cluster.array_parallelism",
    "dependency": "the stage DAG sets it (afterok/aftercorr/afterany)",
    "kill-on-invalid-dep": "the launcher sets it so failed dependencies cancel",
    "export": "jobs must inherit the submitting environment (secrets travel that way)",
    "export-file": "jobs must inherit the submitting environment (secrets travel that way)",
    "get-user-env": "jobs must inherit the submitting environment (secrets travel that way)",
    "signal": "set cluster.preempt_signal (USR2 or TERM) and cluster.signal_delay_s (it drives checkpoint + requeue)",
    "requeue": "set cluster.max_requeues (0 = no requeue)",
    "no-requeue": "set cluster.max_requeues (0 = no requeue)",
    "comment": "the launcher tags each job with its launch id there (sbatch retry adopts by it)",
    "wrap": "the launcher writes the batch script",
    "chdir": "jobs start in the submitting directory; paths in configs are relative to it",
    "parsable": "the launcher parses sbatch's output",
    "wait": "the launcher submits and returns",
    "test-only": "use dry_run=true",
    "partition": "set cluster.partition",
    "account": "set cluster.account",
    "qos": "set cluster.qos",
    "constraint": "set cluster.constraint",
    "nodes": "set cluster.nodes",
    "ntasks": "set cluster.nodes and cluster.gpus_per_node (one task per GPU)",
    "ntasks-per-node": "set cluster.gpus_per_node (one task per GPU)",
    "cpus-per-task": "set cluster.cpus_per_task",
    "gpus-per-node": "set cluster.gpus_per_node / cluster.aux_gpus",
    "time": "set cluster.time / cluster.aux_time",
    "mem": "set cluster.mem",
    "mem-per-gpu": "set cluster.mem_per_gpu",
}
# Site options a cluster may need; anything else is refused (so a typo cannot become another option).
ALLOWED_SBATCH = frozenset((
    "acctg-freq", "batch", "bb", "bbf", "begin", "cluster-constraint", "clusters", "core-spec", "cores-per-socket",
    "cpu-freq", "cpus-per-gpu", "deadline", "delay-boot", "distribution", "exclude", "exclusive", "extra",
    "gpu-bind", "gpu-freq", "gpus", "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "hint", "hold",
    "licenses", "mail-type", "mail-user", "mcs-label", "mem-bind", "mem-per-cpu", "mincpus", "network", "nice",
    "nodefile", "nodelist", "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-socket", "oversubscribe", "power",
    "prefer", "priority", "profile", "propagate", "reboot", "reservation", "sockets-per-node", "spread-job",
    "switches", "thread-spec", "threads-per-core", "time-min", "tmp", "tres-per-task", "use-min-nodes", "wckey",
))  # fmt: skip


def _control(key: str, value: object) -> list[str]:
    text = str(value)
    match = _CONTROL_RE.search(text)
    if match is None:
        return []
    return [
        f"{key} contains a control character ({match.group()!r} in {text!r}); job scripts take one line per "
        "value: remove newlines, carriage returns, NULs and tabs"
    ]


def sbatch_extra_key_problem(name: str) -> str | None:
    """Why `cluster.sbatch_extra.<name>` is refused, or None when it may be passed to sbatch."""
    key = name.replace("_", "-")
    if not _SBATCH_KEY_RE.match(key):
        return (
            f"cluster.sbatch_extra key {name!r} is not an sbatch long option name (lower-case letters, digits, "
            "'-'); write e.g. `reservation: r1` for `#SBATCH --reservation=r1`"
        )
    if key in OWNED_SBATCH:
        return f"cluster.sbatch_extra.{name} is set by gptoss_hpc itself: {OWNED_SBATCH[key]}; remove it"
    if key not in ALLOWED_SBATCH:
        return (
            f"cluster.sbatch_extra.{name} is not an sbatch option gptoss_hpc passes through; use one of "
            f"{', '.join(sorted(ALLOWED_SBATCH))} (full names: sbatch also reads abbreviations)"
        )
    return None


def site_problems(cfg: RunConfig) -> list[str]:
    """Every rendered cluster value that could break out of its line or its quoting."""
    c, p = cfg.cluster, []
    p += _control("run_root", cfg.run_root)  # part of every log path and the stage command line
    for key in ("partition", "account", "qos", "constraint", "mem", "mem_per_gpu", "hf_home"):
        value = getattr(c, key, None)
        if value is not None:
            p += _control(f"cluster.{key}", value)
            if key != "hf_home" and any(q in str(value) for q in "'\"\\"):
                p.append(f"cluster.{key} {value!r} holds a quote or backslash; #SBATCH values take neither")
    for name, value in c.env.items():
        if not ENV_NAME_RE.match(str(name)):
            p.append(
                f"cluster.env key {name!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*); "
                "rename it (values are quoted, names cannot be)"
            )
        p += _control(f"cluster.env.{name}", value)
    for i, line in enumerate(c.setup):
        p += _control(f"cluster.setup[{i}]", line)
    for name, value in c.sbatch_extra.items():
        problem = sbatch_extra_key_problem(str(name))
        if problem:
            p.append(problem)
        if value is not None and not isinstance(value, bool):
            p += _control(f"cluster.sbatch_extra.{name}", value)
            if any(q in str(value) for q in "'\"\\"):
                p.append(f"cluster.sbatch_extra.{name} {value!r} holds a quote or backslash; #SBATCH takes neither")
    ct = c.container
    if ct.image is not None:
        p += _control("cluster.container.image", ct.image)
    for i, mount in enumerate(ct.mounts):
        p += _control(f"cluster.container.mounts[{i}]", mount)
        if ct.kind == "pyxis" and "," in mount:
            p.append(f"cluster.container.mounts[{i}] {mount!r} holds ','; pyxis joins mounts with ','")
    for i, arg in enumerate(ct.extra_args):
        p += _control(f"cluster.container.extra_args[{i}]", arg)
    return p
