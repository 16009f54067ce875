"""submitit's SlurmExecutor with two changes: sbatch retried on transient errors, and rendering without Slurm.

- `TaggedSlurmExecutor` sends each job's `#SBATCH --comment=gptoss_hpc:<launch id>:<stage>` tag. When sbatch
  fails with a transient controller error ("Socket timed out", "Unable to contact slurm controller" ...),
  it waits (exponential backoff), looks the tag up in squeue (gptoss_hpc.slurm.find_tagged) and adopts a job
  that sbatch did create before its reply was lost; only when no such job exists does it submit again. So a
  flaky controller never leaves an untracked duplicate.
- `RenderOnlyExecutor` renders the same sbatch text on a machine with no Slurm client (a laptop preparing
  a dry run), where submitit's constructor raises `Could not detect "srun"`.

The subclass points, all of submitit 1.5's SlurmExecutor (pinned <2 in pyproject.toml): `_submit_command` (its
body, with the sbatch call replaced by `sbatch_with_retry`), `_internal_process_submissions` (its array path
builds a plain SlurmExecutor, which would bypass the retry) and `_make_submission_file_text` (read by
`submission.backends.render_scripts` for the dry run). submitit has no public hook for the sbatch call or the
script text; `tests/test_sbatch_retry.py` and the sbatch golden files fail if these change shape.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
import typing as tp
import uuid
from collections.abc import Callable

from submitit.core import core, utils
from submitit.slurm.slurm import SlurmExecutor, SlurmJob

from gptoss_hpc.errors import SubmissionError
from gptoss_hpc.slurm import find_tagged

log = logging.getLogger(__name__)

# sbatch's stderr for failures of the controller or the network, not of the job request.
TRANSIENT = re.compile(
    r"Socket timed out|Unable to contact slurm controller|Connection refused|Connection timed out|"
    r"Resource temporarily unavailable|Zero Bytes were transmitted|temporarily unable to accept job|"
    r"Communication connection failure|Transport endpoint is not connected|Slurm backup controller in standby",
    re.IGNORECASE,
)
_JOB_ID_RE = re.compile(r"job (?P<id>[0-9]+)")


def job_tag(launch_id: str, stage: str) -> str:
    """The unique comment one stage's job carries: what a retry looks up before submitting again."""
    return f"gptoss_hpc:{launch_id}:{stage}"


def sbatch_with_retry(
    command: list[str],
    *,
    tag: str,
    job_name: str,
    retries: int,
    delay_s: float,
    lookup: Callable[[str, str], list[str]] = find_tagged,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Run sbatch; on a transient error wait, adopt the tagged job if it exists, else submit again.

    At most `retries` further attempts, waiting delay_s, 2*delay_s, 4*delay_s ... Returns the job id.
    """
    attempt = 0
    while True:
        try:
            proc = subprocess.run(command, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            text = f"{exc.stderr or ''}{exc.stdout or ''}".strip()
            if not TRANSIENT.search(text):
                raise SubmissionError(f"sbatch failed (exit {exc.returncode}): {text}") from exc
            while True:  # before any new sbatch, make sure the failed one did not create the job
                if attempt >= retries:
                    raise SubmissionError(
                        f"sbatch failed {attempt + 1} time(s) with a transient error, last: {text}\n"
                        f"no job tagged {tag!r} was found; raise cluster.sbatch_retries or retry the launch"
                    ) from exc
                wait = delay_s * 2**attempt
                attempt += 1
                log.warning("sbatch failed (%s); looking for job %s in %.0f s (retry %d/%d)",
                            text.splitlines()[-1] if text else "no output", tag, wait, attempt, retries)  # fmt: skip
                sleep(wait)
                try:
                    found = lookup(tag, job_name)
                except (OSError, subprocess.SubprocessError) as look_exc:
                    text = f"could not look the job up: {look_exc}"
                    continue  # unknown whether it exists: never submit blind, wait and look again
                break
            if len(found) > 1:
                raise SubmissionError(f"several jobs carry the tag {tag!r}: {found}; scancel the extra ones") from exc
            if found:
                log.warning("adopted job %s: sbatch had created it before failing", found[0])
                return found[0]
            continue
        match = _JOB_ID_RE.search(proc.stdout)
        if match is None:
            raise SubmissionError(f"could not read a job id from sbatch's output {proc.stdout!r}")
        return match.group("id")


class TaggedSlurmExecutor(SlurmExecutor):
    """SlurmExecutor whose sbatch call is `sbatch_with_retry`, for single jobs and arrays alike."""

    def __init__(self, folder: tp.Any, *, retries: int = 0, retry_delay_s: float = 5.0, **kwargs: tp.Any) -> None:
        super().__init__(folder, **kwargs)
        self.retries = retries
        self.retry_delay_s = retry_delay_s

    def _submit_command(self, command: str) -> core.Job[tp.Any]:
        # submitit's own body, with the sbatch call replaced.
        tmp_uuid = uuid.uuid4().hex
        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        submission_file_path = folder / f".submission_file_{tmp_uuid}.sh"
        submission_file_path.write_text(self._make_submission_file_text(command, tmp_uuid))
        job_id = sbatch_with_retry(
            self._make_submission_command(submission_file_path),
            tag=str(self.parameters.get("comment", "")),
            job_name=str(self.parameters.get("job_name", "")),
            retries=self.retries,
            delay_s=self.retry_delay_s,
        )
        job: core.Job[tp.Any] = self.job_class(folder=self.folder, job_id=job_id, tasks=list(range(self._num_tasks())))
        job.paths.move_temporary_file(submission_file_path, "submission_file", keep_as_symlink=True)
        self._write_job_id(job.job_id, tmp_uuid)
        self._set_job_permissions(job.paths.folder)
        return job

    def _internal_process_submissions(
        self, delayed_submissions: list[utils.DelayedSubmission]
    ) -> list[core.Job[tp.Any]]:
        if len(delayed_submissions) == 1:
            return super()._internal_process_submissions(delayed_submissions)
        # submitit builds a plain SlurmExecutor for the array, which would bypass the retry: same steps here.
        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickle_paths = []
        for d in delayed_submissions:
            pickle_path = folder / f"{uuid.uuid4().hex}.pkl"
            d.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
            d.dump(pickle_path)
            pickle_paths.append(pickle_path)
        n = len(delayed_submissions)
        self.parameters["map_count"] = n
        try:
            first_job = self._submit_command(self._submitit_command_str)
        finally:
            del self.parameters["map_count"]
        jobs: list[core.Job[tp.Any]] = [
            SlurmJob(folder=self.folder, job_id=f"{first_job.job_id}_{a}", tasks=list(range(first_job.num_tasks)))
            for a in range(n)
        ]
        for job, pickle_path in zip(jobs, pickle_paths, strict=True):
            job.paths.move_temporary_file(pickle_path, "submitted_pickle")
        return jobs


class RenderOnlyExecutor(TaggedSlurmExecutor):
    """Renders sbatch text where no Slurm client is installed; it cannot submit."""

    @classmethod
    def affinity(cls) -> int:
        return 1  # submitit's constructor refuses a non-positive affinity ("Could not detect srun")

    def _submit_command(self, command: str) -> core.Job[tp.Any]:
        raise SubmissionError("a dry-run executor cannot submit")
