"""Files inside the guest: the volumes on a VM's disks (partitions, LVM logical volumes,
whole disks), the file systems on them, and paths resolved across the guest's tree.

Everything reads through the same random-access DiskViews that `serve` and `mount` use
(access.open_disks), so every source and every stored check applies unchanged. The file
system parsers are the dissect family's (an optional extra, `.[files]`, AGPL-3.0),
imported only here:

- stream.py: a DiskView (or a window of one) as the file object the parsers read;
- volumes.py: partition tables, LVM2 and what lies on each volume (by signature);
- filesystems.py: one small adapter per parser, all giving the same Entry;
- guest.py: which file system a path is on (--fs, `vol:/path`, or /etc/fstab);
- copy.py: copy-out (modes, times, symlinks, sparse files, all-or-nothing per file).
"""
