// Package treediff records what a directory tree holds, path by path, and
// says how two trees differ. It is how tests prove that an unpacked or lazily
// mounted image is the image: content, type, mode, owner, xattrs, link
// targets, device numbers and hardlink groups.
//
// Times are not compared: overlayfs and containerd's unpacking legitimately
// change directory times, and lazy mounts report the TOC's times, which
// carry no sub-second part.
package treediff

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

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
		n := Node{UID: st.Uid, GID: st.Gid, Nlink: uint64(st.Nlink)}
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
			n.Type = "dir"
			n.Nlink = 0 // depends on subdirectory count bookkeeping of the filesystem
		case syscall.S_IFLNK:
			n.Type = "symlink"
			if n.Link, err = os.Readlink(p); err != nil {
				return err
			}
			n.Mode = 0 // symlink permissions mean nothing on Linux
		case syscall.S_IFCHR:
			n.Type, n.Rdev = "char", fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case syscall.S_IFBLK:
			n.Type, n.Rdev = "block", fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case syscall.S_IFIFO:
			n.Type = "fifo"
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
			out = append(out, fmt.Sprintf("%s: only in second (%s)", p, nb.Type))
		case !inB:
			out = append(out, fmt.Sprintf("%s: only in first (%s)", p, na.Type))
		default:
			out = append(out, nodeDiff(p, na, nb)...)
		}
	}
	return out
}

func nodeDiff(p string, a, b Node) []string {
	var out []string
	add := func(field string, x, y any) {
		out = append(out, fmt.Sprintf("%s: %s %v != %v", p, field, x, y))
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
	if fmt.Sprint(a.Xattrs) != fmt.Sprint(b.Xattrs) {
		add("xattrs", a.Xattrs, b.Xattrs)
	}
	if a.LinkSet != b.LinkSet {
		add("hardlinks", a.LinkSet, b.LinkSet)
	}
	if a.Type != "dir" && a.Nlink != b.Nlink {
		add("link count", a.Nlink, b.Nlink)
	}
	return out
}
