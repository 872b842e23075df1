"""File helpers of the instance storage: atomic JSON records, removal,
sparse copies of instance directories."""
import json
import os
import shutil


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def remove(path):
    """Remove a file or a directory tree; True if something was there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
        return True
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def copy_sparse(src, dst):
    """Copy a file keeping its holes (a 40 GB empty disk stays empty)."""
    size = os.path.getsize(src)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole is left
                break
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            fin.seek(data)
            fout.seek(data)
            left = hole - data
            while left:
                chunk = fin.read(min(left, 8 << 20))
                fout.write(chunk)
                left -= len(chunk)
            offset = hole
        fout.truncate(size)


def copy_instance(src, dst, domain_xml=None, disk_bytes=None):
    """Copy an instance directory (flat) to ``dst`` in one step: the copy
    is made under a temporary name, given ``domain_xml`` as its
    libvirt.xml and its disk grown to ``disk_bytes``, then renamed."""
    tmp = f"{dst}.partial"
    remove(tmp)
    os.makedirs(tmp)
    for name in sorted(os.listdir(src)):
        copy_sparse(os.path.join(src, name), os.path.join(tmp, name))
    if domain_xml is not None:
        with open(os.path.join(tmp, "libvirt.xml"), "w") as f:
            f.write(domain_xml)
    disk = os.path.join(tmp, "disk")
    if disk_bytes and os.path.isfile(disk) and os.path.getsize(disk) < disk_bytes:
        os.truncate(disk, int(disk_bytes))
    os.replace(tmp, dst)
