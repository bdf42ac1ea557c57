// Package treediff records what a directory tree holds, path by path, and
// says how two trees differ. It is how tests prove that an unpacked or lazily
// mounted image is the image: content, type, mode, owner, xattrs, link
// targets, device numbers, link counts, hardlink groups and mtimes.
//
// The comparison is strict: every mode bit (type, permissions, setuid,
// setgid, sticky, also of symlinks), owner, size, content, link target, every
// xattr name and value, device numbers, link count (of directories too),
// hardlink group and mtime. Left out, because they describe the filesystem
// or the mount rather than the image: the size and block count of
// directories, atime and ctime, sub-second mtimes (an eStargz TOC keeps whole
// seconds), the mtime of the root (made by the unpacking or the mount), and
// the xattrs overlayfs keeps for itself (trusted.overlay.*) and the SELinux
// label. Compare two views of the same kind (for example two overlay mounts
// of the layers) so that link counts of merged directories mean the same.
package treediff

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Node is what is recorded of one path.
type Node struct {
	Type    string // file, dir, symlink, char, block, fifo, socket
	Mode    fs.FileMode
	UID     uint32
	GID     uint32
	Size    int64
	SHA256  string
	Link    string
	Rdev    string            // major:minor for devices
	Xattrs  map[string]string // hex-encoded values
	Nlink   uint64
	LinkSet string // the sorted paths sharing this inode, when more than one
	Mtime   int64  // seconds since the epoch; 0 for the root
}

// Tree maps a slash-separated path relative to the root ("." for the root) to its node.
type Tree map[string]Node

// ignoredXattr reports xattrs that describe the mount, not the image.
func ignoredXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || name == "security.selinux"
}

// Snapshot records the tree at root.
func Snapshot(root string) (Tree, error) {
	t := Tree{}
	inodes := map[[2]uint64][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
		n := Node{UID: st.Uid, GID: st.Gid, Nlink: uint64(st.Nlink), Mtime: st.Mtim.Sec}
		if rel == "." {
			n.Mtime = 0
		}
		n.Mode = fs.FileMode(st.Mode & 0o7777)
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			n.Type, n.Size = "file", st.Size
			sum, err := hashFile(p)
			if err != nil {
				return err
			}
			n.SHA256 = sum
		case syscall.S_IFDIR:
			n.Type = "dir" // Size left 0: it is the filesystem's bookkeeping
		case syscall.S_IFLNK:
			// Size is kept: readlink(1) and others size their buffer by it.
			n.Type, n.Size = "symlink", st.Size
			if n.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case syscall.S_IFCHR:
			n.Size = st.Size
			n.Type, n.Rdev = "char", fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case syscall.S_IFBLK:
			n.Size = st.Size
			n.Type, n.Rdev = "block", fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case syscall.S_IFIFO:
			n.Type, n.Size = "fifo", st.Size
		case syscall.S_IFSOCK:
			n.Type = "socket"
		default:
			n.Type = fmt.Sprintf("unknown(%o)", st.Mode&syscall.S_IFMT)
		}
		xs, err := xattrs(p)
		if err != nil {
			return err
		}
		n.Xattrs = xs
		if n.Type != "dir" && st.Nlink > 1 {
			k := [2]uint64{st.Dev, st.Ino}
			inodes[k] = append(inodes[k], rel)
		}
		t[rel] = n
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, paths := range inodes {
		if len(paths) < 2 {
			continue
		}
		sort.Strings(paths)
		set := strings.Join(paths, "|")
		for _, p := range paths {
			n := t[p]
			n.LinkSet = set
			t[p] = n
		}
	}
	return t, nil
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func xattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil {
		if err == unix.ENOTSUP {
			return nil, nil
		}
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	if size == 0 {
		return nil, nil
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	out := map[string]string{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if name == "" || ignoredXattr(name) {
			continue
		}
		vsize, err := unix.Lgetxattr(p, name, nil)
		if err == unix.ENODATA || err == unix.ENOTSUP || err == unix.EPERM {
			// Listed but unreadable (for example user.* on a fifo, which
			// the kernel refuses to read): a difference to show, not a
			// reason to stop.
			out[name] = "unreadable: " + err.Error()
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		v := make([]byte, vsize)
		if vsize > 0 {
			if vsize, err = unix.Lgetxattr(p, name, v); err != nil {
				return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
			}
		}
		out[name] = hex.EncodeToString(v[:vsize])
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// Diff lists how b differs from a, one line per difference; nil when equal.
func Diff(a, b Tree) []string {
	var out []string
	paths := map[string]bool{}
	for p := range a {
		paths[p] = true
	}
	for p := range b {
		paths[p] = true
	}
	sorted := make([]string, 0, len(paths))
	for p := range paths {
		sorted = append(sorted, p)
	}
	sort.Strings(sorted)
	for _, p := range sorted {
		na, inA := a[p]
		nb, inB := b[p]
		switch {
		case !inA:
			out = append(out, fmt.Sprintf("%s: only in second (%s)", quote(p), nb.Type))
		case !inB:
			out = append(out, fmt.Sprintf("%s: only in first (%s)", quote(p), na.Type))
		default:
			out = append(out, nodeDiff(p, na, nb)...)
		}
	}
	return out
}

// quote shows a path with newlines, control characters or bytes that are
// not UTF-8 as a Go string literal, so that one difference stays one line.
func quote(p string) string {
	if strconv.CanBackquote(p) && utf8.ValidString(p) {
		return p
	}
	return strconv.Quote(p)
}

func nodeDiff(p string, a, b Node) []string {
	var out []string
	add := func(field string, x, y any) {
		out = append(out, fmt.Sprintf("%s: %s %v != %v", quote(p), field, x, y))
	}
	if a.Type != b.Type {
		add("type", a.Type, b.Type)
		return out
	}
	if a.Mode != b.Mode {
		add("mode", fmt.Sprintf("%#o", uint32(a.Mode)), fmt.Sprintf("%#o", uint32(b.Mode)))
	}
	if a.UID != b.UID || a.GID != b.GID {
		add("owner", fmt.Sprintf("%d:%d", a.UID, a.GID), fmt.Sprintf("%d:%d", b.UID, b.GID))
	}
	if a.Size != b.Size {
		add("size", a.Size, b.Size)
	}
	if a.SHA256 != b.SHA256 {
		add("content", a.SHA256, b.SHA256)
	}
	if a.Link != b.Link {
		add("link target", a.Link, b.Link)
	}
	if a.Rdev != b.Rdev {
		add("device", a.Rdev, b.Rdev)
	}
	if !maps.Equal(a.Xattrs, b.Xattrs) {
		add("xattrs", a.Xattrs, b.Xattrs)
	}
	if a.LinkSet != b.LinkSet {
		add("hardlinks", a.LinkSet, b.LinkSet)
	}
	if a.Nlink != b.Nlink {
		add("link count", a.Nlink, b.Nlink)
	}
	if a.Mtime != b.Mtime {
		add("mtime", time.Unix(a.Mtime, 0).UTC().Format(time.RFC3339), time.Unix(b.Mtime, 0).UTC().Format(time.RFC3339))
	}
	return out
}
