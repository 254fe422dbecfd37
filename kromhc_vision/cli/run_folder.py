"""train.py's run folder: which folder a run writes, never another run's by accident, and one run at a time.

A folder holds a run when it has any of :data:`RUN_FILES` or a ``checkpoint-*.pth.tar``. A new run into such a
folder is refused unless ``--overwrite`` is given (then those files are removed first, so no stale checkpoint
survives); ``--resume <folder>/last.pth.tar`` continues the run in it. While a run uses its folder it holds an
exclusive ``fcntl.flock`` on ``<folder>/.train.lock``: the kernel releases it when the process ends, however it
ends, so a killed run leaves no lock that blocks its ``--resume``.
"""
import fcntl
import glob
import os
from datetime import datetime

from timm.models import safe_model_name

from . import ConfigError

RUN_FILES = ('args.yaml', 'summary.csv', 'summary.json', 'steps.csv', 'last.pth.tar', 'model_best.pth.tar')
LOCK_FILE = '.train.lock'


def resume_dir(args):
    return os.path.dirname(os.path.abspath(args.resume)) if args.resume else None


def choose_run_dir(args, input_size) -> str:
    """``<resume folder>`` (a train.py run resumed without --output / --experiment), else
    ``<output or ./output/train>/<experiment or time-model-size>``."""
    folder = resume_dir(args)
    if folder and not (args.output or args.experiment) and os.path.isfile(os.path.join(folder, 'args.yaml')):
        return folder
    name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                                        str(input_size[-1])])
    return os.path.abspath(os.path.join(args.output or './output/train', name))


def run_files(folder) -> list:
    """The files of a run in ``folder``."""
    names = [os.path.join(folder, n) for n in RUN_FILES]
    return [p for p in names if os.path.exists(p)] + sorted(glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar')))


def resumes_in(args, folder) -> bool:
    resumed = resume_dir(args)
    return bool(resumed) and os.path.isdir(folder) and os.path.samefile(resumed, folder)


def check_run_dir(args, folder):
    """Refuse another run's folder (unless resuming it or --overwrite) and a folder that cannot be written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f'output: {folder} exists and is not a folder')
    if run_files(folder) and not resumes_in(args, folder) and not args.overwrite:
        last = os.path.join(folder, 'last.pth.tar')
        way_on = f'continue it with --resume {last}, or give a new --experiment name (or --overwrite to replace it)' \
            if os.path.isfile(last) else ('no epoch of it finished (no last.pth.tar to resume): start it again with '
                                          '--overwrite, or give a new --experiment name')
        raise ConfigError(f'output: {folder} already holds a run '
                          f'({", ".join(os.path.basename(p) for p in run_files(folder))}); {way_on}')
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):  # a file: even an executable one
        raise ConfigError(f'output: cannot write to {existing} (for the run folder {folder})')


def write_run_file(folder, name, text):
    """Write ``<folder>/<name>`` atomically (a temporary file renamed over it): a failed or killed write leaves the
    previous file whole, e.g. the args.yaml of the run being resumed."""
    path = os.path.join(folder, name)
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunLock:
    """An exclusive lock on a run folder for the life of this process (or until :meth:`release`)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_FILE)
        try:  # what access() could not tell (e.g. a pseudo file system that takes no folders)
            os.makedirs(folder, exist_ok=True)
            self.file = open(self.path, 'a+')
        except OSError as e:
            raise ConfigError(f'output: cannot write the run folder {folder}: {e.strerror or e}') from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'unknown'
            self.file.close()
            raise ConfigError(f'output: {folder} is in use by another train.py run (pid {holder}); wait for it to '
                              'end, or give a new --experiment name') from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        self.file.close()


def open_run_dir(args, folder) -> RunLock:
    """Lock ``folder``, check it again under the lock (another run may have started since), clear it for
    --overwrite; returns the lock, held until the process ends."""
    lock = RunLock(folder)
    try:
        check_run_dir(args, folder)
    except ConfigError:
        lock.release()
        raise
    if args.overwrite and not resumes_in(args, folder):
        for path in run_files(folder):
            os.remove(path)
    return lock
