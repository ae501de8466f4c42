"""Two ranks whose out dir is not one filesystem: rank r runs train_math with --out-dir BASE/CASE/view{r}, the way
two nodes with node-local disks see one path. Each rank writes the error it stopped with to BASE/{case}.rank{r}.txt:

    lock    rank 1 does not see the lock file rank 0 wrote (start-up)
    save    rank 1 sees rank 0's lock file (a symlink to it) but not the checkpoint rank 0 saves (the first save)
    resume  that run resumed: rank 1 does not see the checkpoint rank 0 picks

Usage: torchrun --nproc_per_node=2 tests/views_worker.py BASE TRAIN TEST POLICY
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed  # noqa: E402
import loading  # noqa: E402
import rundir  # noqa: E402
import train_math  # noqa: E402

rundir.SHARED_FS_WAIT = 1.0  # the time a rank gives a network filesystem to show rank 0's file


def main(base: Path, train: str, test: str, policy: str):
    rank = distributed.init_distributed()[0]
    if rank == 0:
        (base / "save" / "view1").mkdir(parents=True)
        (base / "save" / "view1" / ".lock").symlink_to(base / "save" / "view0" / ".lock")
    distributed.barrier()
    for case, run, extra in (("lock", "lock", []), ("save", "save", []), ("resume", "save", ["--resume"])):
        args = ["--preset", "toy", "--model", policy, "--dataset", train, "--test-dataset", test, "--out-dir",
                str(base / run / f"view{rank}"), "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
                "--max-new-tokens", "8", "--eval-limit", "4", "--eval-every", "0", *extra]
        try:
            train_math.main(loading.parse_config(train_math.Config, args, train_math.PRESETS))
            message = "no error"
        except SystemExit as e:
            message = str(e.code)
        (base / f"{case}.rank{rank}.txt").write_text(message)
    distributed.finish_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
