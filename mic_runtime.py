"""Run infrastructure shared by every script: the errors that end a run with one clear line,
atomic file writes with OS-error messages, output-folder checks, distributed set-up and thread caps.

    atomic_write(path, lambda f: f.write(data))   # temp file + rename; OutputError names folder and cause
    check_writable(work_dir)                        # fail now, not after hours of training
    rank, world, device = setup_distributed()       # torchrun's environment, nanoGPT style
    print0('only rank 0 prints')
    exit_error(e)                                   # 'error: <message>' on stderr, exit status 2

Holds nothing of the method, the data or the models. Imports only the standard library and torch;
every other module of the project may import it.
"""
import datetime
import errno
import json
import os
import re
import secrets
import sys

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------
# Errors that end a run with one line
# --------------------------------------------------------------------------

class DataError(Exception):
    """A data problem (missing folder, unreadable file, wrong format); the message says how to fix it.

    Raised in a DataLoader worker, it reaches the main process as type(e)(text) with the text
    'Caught DataError in DataLoader worker process 0.', the worker's traceback and its last line
    'mic_data.DataError: <message>'. The message is recovered from that text here, so that every
    script prints one line; the text stays in `worker_traceback`.
    """

    def __init__(self, message='', *args):
        self.worker_traceback = None
        if isinstance(message, str) and message.startswith(f'Caught {type(self).__name__} in DataLoader worker'):
            # the traceback's last line is '<module>.<class name>: <message>' (the message may span lines)
            lines = list(re.finditer(rf'^(?:[\w.]+\.)?{type(self).__name__}: ', message, re.MULTILINE))
            if lines:
                self.worker_traceback = message
                message = message[lines[-1].end():].rstrip('\n')
        super().__init__(message, *args)


class OutputError(DataError):
    """An output file or folder cannot be written: read-only file system, full disk, no permission,
    impossible path. The message names the folder, the cause and what to do."""


def exit_error(message):
    """How every script stops on a clear error: one line 'error: <message>' on stderr and exit
    status 2 (argparse's status for usage errors too). `message` may be an exception."""
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)



# --------------------------------------------------------------------------
# Writing files atomically, with messages that name the folder and the cause
# --------------------------------------------------------------------------

# errno -> (cause, what to do); {folder} is the output folder
_WRITE_FAULTS = {
    errno.EROFS: ('{folder} is on a read-only file system', 'choose a folder on a writable disk'),
    errno.ENOSPC: ('no space is left on the disk of {folder}', 'free some space or choose a folder on another disk'),
    errno.EDQUOT: ('the disk quota of {folder} is used up', 'free some space or choose a folder on another disk'),
    errno.EFBIG: ('the file is too large for the file system of {folder}', 'choose a folder on another disk'),
    errno.EACCES: ('permission denied in {folder}', 'choose a folder you can write to, or change its permissions'),
    errno.EPERM: ('permission denied in {folder}', 'choose a folder you can write to, or change its permissions'),
    errno.ENOENT: ('the folder {folder} does not exist', 'create it or choose an existing folder'),
    errno.ENOTDIR: ('a part of {folder} is a file, not a folder', 'choose another folder'),
    errno.EISDIR: ('a folder has the name of the file', 'remove that folder or choose another one'),
}


def _errno_text(e):
    return f'[{errno.errorcode.get(e.errno, e.errno)}] {e.strerror or e}'


def output_error(e, path, folder=None, what=None):
    """OutputError for the OSError `e` raised while writing `path` (a file in `folder`):
    '<what, default: cannot write PATH>: <cause naming the folder> ([ERRNO] text); <what to do>'."""
    folder = folder or os.path.dirname(os.path.abspath(path))
    cause, advice = _WRITE_FAULTS.get(e.errno, ('{folder}: ' + str(e.strerror or e), 'choose another folder'))
    return OutputError(f'{what or f"cannot write {path}"}: {cause.format(folder=folder)} ({_errno_text(e)}); {advice}')


def make_dirs(folder):
    """os.makedirs(folder, exist_ok=True); OutputError (naming the folder and the cause) when impossible."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        parent = os.path.abspath(folder)
        while not os.path.isdir(parent):  # the deepest folder that exists
            parent = os.path.dirname(parent)
        if isinstance(e, FileExistsError) or e.errno == errno.ENOTDIR:
            cause = 'a file of that name (or of one of its parents) exists'
        elif e.errno == errno.ENOENT:  # e.g. under /proc: the parent exists but takes no new folders
            cause = f'{parent} does not allow new folders'
        else:
            cause = _WRITE_FAULTS.get(e.errno, ('{folder}: ' + str(e.strerror), ''))[0].format(folder=parent)
        raise OutputError(f'cannot create the folder {folder}: {cause} ({_errno_text(e)}); '
                          f'choose another output folder') from None


def check_writable(folder):
    """Create `folder` if needed and write (then delete) a small hidden file in it, so that a
    read-only, full or forbidden output folder fails now with OutputError, not after hours of work."""
    make_dirs(folder)
    probe = os.path.join(folder, f'.write_check.{secrets.token_hex(4)}.tmp')  # a temp file (is_temp_file)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(b'MIC write check\n')
        finally:
            os.unlink(probe)
    except OSError as e:
        raise output_error(e, probe, folder, what=f'cannot write to the folder {folder}') from None


def atomic_write(path, write_fn, mode='wb'):
    """Call write_fn(f) on a temporary file beside `path`, then rename it to `path`.

    A crash never leaves a half-written file under the final name; leftovers are hidden files
    named '.<name>.<random>.tmp' in the same folder. An OSError while writing (read-only file
    system, full disk, permissions, missing folder) removes the temporary file, keeps an existing
    `path` as it was and raises OutputError naming the folder, the cause and what to do.
    """
    folder = os.path.dirname(path) or '.'
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{secrets.token_hex(4)}.tmp')
    # os.open with 0o666 (not mkstemp's 0o600) so the result gets the usual umask permissions
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise output_error(e, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = _os_error_in(e)
        if cause is not None:
            raise output_error(cause, path) from None
        raise


def _os_error_in(e):
    """The OSError (with an errno) that `e` is or arose from: a writer may replace the OSError of
    its file by its own error while cleaning up (torch.save: RuntimeError 'unexpected pos')."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def remove_temp_files(folder):
    """Delete the hidden temporary files that a killed atomic_write left in `folder`; their names."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if is_temp_file(name):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def is_temp_file(name):
    """True for the leftover temporary files of an interrupted atomic_write."""
    return name.startswith('.') and name.endswith('.tmp')


def save_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode='w')


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode='w')



# --------------------------------------------------------------------------
# Processes: torchrun set-up (nanoGPT style) and thread caps
# --------------------------------------------------------------------------

DIST_TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits this long for a rank that died, then fails


def setup_distributed(device=None):
    """(rank, world_size, device) from torchrun's environment variables.

    Without RANK in the environment: (0, 1, device or cuda if available else cpu). Under torchrun the
    process group is initialised (NCCL on GPUs, device from LOCAL_RANK; gloo on the CPU) unless it
    already is. device: 'cpu', 'cuda' or None (cuda when available).
    """
    want = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(want)
    local = int(os.environ.get('LOCAL_RANK', 0))
    if str(want).startswith('cuda'):
        torch.cuda.set_device(local)
        dev = torch.device('cuda', local)
        if not dist.is_initialized():
            dist.init_process_group('nccl', device_id=dev, timeout=DIST_TIMEOUT)
    else:
        dev = torch.device('cpu')
        if not dist.is_initialized():
            dist.init_process_group('gloo', timeout=DIST_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), dev


def is_main():
    """True on rank 0, or when not distributed: the process that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def usable_cores():
    """The CPU cores this process may use: its affinity mask (taskset, a container's cpuset),
    lowered to a cgroup v2 CPU quota (docker --cpus) when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open('/sys/fs/cgroup/cpu.max') as f:
            quota, period = f.read().split()[:2]
        if quota != 'max':
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def limit_threads(local_world_size=None):
    """Cap this process's torch intra-op threads at usable_cores() divided by the processes of
    this node (local_world_size; default: torchrun's LOCAL_WORLD_SIZE, else 1). Never raises the
    number (OMP_NUM_THREADS=1 stays 1). Returns the number of threads now used."""
    if local_world_size is None:
        local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    limit = max(1, usable_cores() // max(1, int(local_world_size)))
    if torch.get_num_threads() > limit:
        torch.set_num_threads(limit)
    return torch.get_num_threads()
