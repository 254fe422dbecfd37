"""train.py's run folder: which folder a run writes, never another run's by accident, and one run at a time.

A folder holds a run when it has any of :data:`RUN_FILES` or a ``checkpoint-*.pth.tar``. A new run into such a
folder is refused unless ``--overwrite`` is given (then those files are removed first, so no stale checkpoint
survives); ``--resume <folder>/last.pth.tar`` continues the run in it. While a run uses its folder it holds an
exclusive ``fcntl.flock`` on ``<folder>/.train.lock``: the kernel releases it when the process ends, however it
ends, so a killed run leaves no lock that blocks its ``--resume``. Its checkpoints are written by
:class:`CheckpointSaver`, whose every file appears whole or not at all.
"""
import fcntl
import glob
import os
import shutil
from datetime import datetime

import timm.utils
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
    temporary = glob.glob(os.path.join(folder, '*.pth.tar.tmp')) + glob.glob(os.path.join(folder, 'tmp.pth.tar'))
    return ([p for p in names if os.path.exists(p)] + sorted(glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar')))
            + sorted(temporary))  # what a kill mid-write leaves (the saver's tmp.pth.tar, a copy's .tmp)


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
    if args.overwrite and not resumes_in(args, folder):
        removed = {os.path.realpath(p) for p in run_files(folder)}
        for key in ('initial_checkpoint', 'pretrained_path'):
            path = getattr(args, key, None)
            if path and os.path.realpath(path) in removed:
                raise ConfigError(f'{key}: {path} is a file of the run in {folder}, which --overwrite removes before '
                                  'it is read; copy it out of the folder first, or give a new --experiment name')
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
        self.folder, self.path = folder, os.path.join(folder, LOCK_FILE)
        self.made_folder = not os.path.isdir(folder)
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

    def release_unused(self):
        """Release the lock, and remove the folder if this lock made it and nothing was written in it since (a run
        refused after the lock was taken, e.g. for data that is not there, leaves no empty folder behind)."""
        try:
            if self.made_folder and os.listdir(self.folder) == [LOCK_FILE]:
                os.unlink(self.path)
                os.rmdir(self.folder)
        except OSError:  # another run began to use the folder meanwhile: it stays
            pass
        self.release()


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


def _fsync_path(path) -> None:
    """Flush ``path`` (a file, or a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointSaver(timm.utils.CheckpointSaver):
    """timm's CheckpointSaver, with each file replaced whole or not at all, whenever the process is killed (and
    flushed to disk before and after its rename, so that a crash of the machine does not leave an empty file where
    filesystems may reorder a rename before the data: XFS, ext4 without ``auto_da_alloc``).

    timm unlinks ``last.pth.tar`` before renaming the new checkpoint over it (for Windows), and copies it to
    ``checkpoint-<epoch>`` / ``model_best`` in place: killed in between, the folder had no ``last.pth.tar``, or a
    truncated copy. Here a rename replaces each file (atomic on POSIX), copies are made under a temporary name first,
    and a resume into the folder makes the copies of the checkpoint it resumes that a kill left unmade.
    """
    resumed_from = None
    made_copies = ()  # what the resume made (see load_state_dict)

    def _replace(self, src, dst):
        _fsync_path(src)  # the data on disk before the name points at it (a crash may not reorder the two)
        os.replace(src, dst)
        _fsync_path(os.path.dirname(dst) or '.')  # the rename itself

    def _duplicate(self, src, dst):
        tmp = f'{dst}.tmp'
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)  # left by a killed copy
            linked = False
            if self.can_hardlink:
                try:
                    os.link(src, tmp)
                    linked = True
                except (OSError, NotImplementedError):
                    self.can_hardlink = False
            if not linked:
                shutil.copy2(src, tmp)
                _fsync_path(tmp)
            os.replace(tmp, dst)
            if os.path.lexists(tmp):  # dst was a link to the same file already: rename() leaves both
                os.unlink(tmp)
            _fsync_path(os.path.dirname(dst) or '.')
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    def load_state_dict_from_checkpoint(self, checkpoint_path):
        self.resumed_from = checkpoint_path
        return super().load_state_dict_from_checkpoint(checkpoint_path)

    def load_state_dict(self, state_dict, make: bool = True) -> list:
        """timm's restore of the checkpoint history; then the copies of the resumed checkpoint (its epoch is
        ``pending``) that the run was killed before making: ``checkpoint-<epoch>`` if it earns a place, as it would
        have, and ``model_best`` if its metric is the best. Returns their paths (``make=False``: the copies are
        not made, only named; the history kept here is then not the folder's)."""
        super().load_state_dict(state_dict)
        epoch, metric = state_dict.get('pending', (None, None))
        last = os.path.join(self.checkpoint_dir, 'last' + self.extension)
        if epoch is None or self.resumed_from is None or not os.path.exists(last) \
                or not os.path.samefile(self.resumed_from, last):
            return []  # only the newest checkpoint's copies can be missing (an older one's model_best was replaced)
        copies = []
        path = self._checkpoint_path(epoch)
        if path not in [f for f, _ in self.checkpoint_files]:  # timm tracks it when the file is there
            worst = self.checkpoint_files[-1] if self.checkpoint_files else None
            if (len(self.checkpoint_files) < self.max_history or worst[1] is None
                    or (metric is not None and self.cmp(metric, worst[1]))):  # as save_checkpoint decides
                if make:
                    if len(self.checkpoint_files) >= self.max_history:
                        self._cleanup_checkpoints(1)
                    self._duplicate(self.resumed_from, path)
                self._track_checkpoint(path, epoch, metric, update_best_file=False)
                copies.append(path)
        best = os.path.join(self.checkpoint_dir, 'model_best' + self.extension)
        if self.best_epoch == epoch and state_dict.get('best_epoch') != epoch \
                and not _same_file(best, self.resumed_from):  # this checkpoint became the best
            if make:
                self._duplicate(self.resumed_from, best)
            copies.append(best)
        if make:
            self.made_copies = copies
        return copies


def _same_file(path, other) -> bool:
    """Whether ``path`` is ``other`` or a copy of it as :meth:`CheckpointSaver._duplicate` makes one: a hard link,
    or a file copy with its size and modification time (``shutil.copy2`` keeps them)."""
    if not os.path.exists(path):
        return False
    a, b = os.stat(path), os.stat(other)
    return os.path.samefile(path, other) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def unmade_copies(checkpoint, saver_state, max_history: int, decreasing: bool) -> list:
    """The copies of ``checkpoint`` (``checkpoint-<epoch>``, ``model_best``) that a kill after it was written
    left unmade in its folder, for a saver of these settings; none unless it is the folder's last.pth.tar.
    ``saver_state``: the checkpoint's ``saver`` entry (None: none recorded)."""
    saver = CheckpointSaver(model=None, optimizer=None, checkpoint_dir=os.path.dirname(os.path.abspath(checkpoint)),
                            decreasing=decreasing, max_history=max_history)
    saver.resumed_from = checkpoint
    return saver.load_state_dict(saver_state, make=False) if saver_state is not None else []
