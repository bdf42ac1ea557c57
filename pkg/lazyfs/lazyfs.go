// Package lazyfs is the FUSE view of one lazily read layer: the exact POSIX
// tree that overlayfs needs of a lower directory, built from the layer's TOC,
// with file contents read chunk by chunk through blob access on first read.
package lazyfs

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/starling-dev/starling/pkg/blob"
)

// Whiteouts of the OCI layer format, and what overlayfs wants instead.
const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
	opaqueXattr    = "trusted.overlay.opaque"
)

// metaFiles are eStargz's own entries at the layer root; they are not part
// of the image's tree.
var metaFiles = map[string]bool{
	estargz.TOCTarName:         true,
	estargz.PrefetchLandmark:   true,
	estargz.NoPrefetchLandmark: true,
}

// readAhead is how far past a read the chunks of the same file are
// fetched along with it.
const readAhead = 4 << 20

// attrTimeout is long because a layer never changes.
const attrTimeout = time.Hour

// Layer is what the filesystem reads from.
type Layer struct {
	TOC    *estargz.Reader
	Chunks *blob.Reader
	Name   string // the layer's digest, for logs
	Logger *slog.Logger
}

// root is the filesystem's root directory node.
type root struct {
	node
	stats statfs
}

type statfs struct {
	blocks uint64
	files  uint64
}

// node is one inode of the tree.
type node struct {
	fs.Inode
	l        *Layer
	e        *estargz.TOCEntry // nil for whiteouts
	whiteout bool
	opaque   bool
}

var (
	_ fs.NodeGetattrer   = (*node)(nil)
	_ fs.NodeGetxattrer  = (*node)(nil)
	_ fs.NodeListxattrer = (*node)(nil)
	_ fs.NodeReadlinker  = (*node)(nil)
	_ fs.NodeOpener      = (*node)(nil)
	_ fs.NodeReader      = (*node)(nil)
	_ fs.NodeStatfser    = (*root)(nil)
	_ fs.NodeOnAdder     = (*root)(nil)
)

// New returns the root of a layer's tree, to pass to Mount.
func New(l *Layer) fs.InodeEmbedder {
	if l.Logger == nil {
		l.Logger = slog.Default()
	}
	e, _ := l.TOC.Lookup("")
	return &root{node: node{l: l, e: e}}
}

// Mount mounts the layer read-only at dir. The caller unmounts with the
// returned server's Unmount.
func Mount(dir string, l *Layer) (*fuse.Server, error) {
	timeout := attrTimeout
	opts := &fs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		MountOptions: fuse.MountOptions{
			AllowOther: true,
			FsName:     "starling",
			Name:       "starling",
			// The kernel checks permissions from the modes we report, as it
			// would for a local lower directory.
			Options:       []string{"ro", "default_permissions"},
			DisableXAttrs: false,
			MaxReadAhead:  1 << 20,
		},
	}
	return fs.Mount(dir, New(l), opts)
}

// OnAdd builds the whole tree from the TOC when the root is mounted.
func (r *root) OnAdd(ctx context.Context) {
	inodes := map[*estargz.TOCEntry]*fs.Inode{}
	var build func(parent *node, pe *estargz.TOCEntry, top bool)
	build = func(parent *node, pe *estargz.TOCEntry, top bool) {
		pe.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
			switch {
			case top && metaFiles[base]:
				return true
			case base == opaqueWhiteout:
				parent.opaque = true
				return true
			case strings.HasPrefix(base, whiteoutPrefix):
				wh := &node{l: r.l, whiteout: true}
				parent.AddChild(base[len(whiteoutPrefix):], parent.NewPersistentInode(ctx, wh, fs.StableAttr{Mode: syscall.S_IFCHR}), true)
				r.stats.files++
				return true
			}
			if in, ok := inodes[e]; ok {
				// A hardlink: the same inode under another name.
				parent.AddChild(base, in, true)
				return true
			}
			n := &node{l: r.l, e: e}
			in := parent.NewPersistentInode(ctx, n, fs.StableAttr{Mode: fileType(e)})
			inodes[e] = in
			parent.AddChild(base, in, true)
			r.stats.files++
			if e.Type == "reg" {
				r.stats.blocks += uint64(e.Size+4095) / 4096
			}
			if e.Type == "dir" {
				build(n, e, false)
			}
			return true
		})
	}
	build(&r.node, r.e, true)
}

func fileType(e *estargz.TOCEntry) uint32 {
	switch e.Type {
	case "dir":
		return syscall.S_IFDIR
	case "symlink":
		return syscall.S_IFLNK
	case "char":
		return syscall.S_IFCHR
	case "block":
		return syscall.S_IFBLK
	case "fifo":
		return syscall.S_IFIFO
	}
	return syscall.S_IFREG
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.SetTimeout(attrTimeout)
	a := &out.Attr
	a.Ino = n.StableAttr().Ino
	if n.whiteout {
		// overlayfs reads a 0/0 character device in a lower layer as a whiteout.
		a.Mode = syscall.S_IFCHR
		a.Nlink = 1
		a.Rdev = 0
		return 0
	}
	e := n.e
	a.Mode = fileType(e) | uint32(e.Mode&0o7777)
	a.Uid, a.Gid = uint32(e.UID), uint32(e.GID)
	a.Nlink = uint32(e.NumLink)
	if a.Nlink == 0 {
		a.Nlink = 1
	}
	switch e.Type {
	case "reg":
		a.Size = uint64(e.Size)
	case "symlink":
		a.Size = uint64(len(e.LinkName))
	case "char", "block":
		a.Rdev = uint32(unix.Mkdev(uint32(e.DevMajor), uint32(e.DevMinor)))
	case "dir":
		a.Size = 4096
	}
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
	mt := e.ModTime()
	a.SetTimes(&mt, &mt, &mt)
	return 0
}

func (n *node) xattrs() map[string][]byte {
	if n.e == nil {
		return nil
	}
	if !n.opaque {
		return n.e.Xattrs
	}
	x := make(map[string][]byte, len(n.e.Xattrs)+1)
	for k, v := range n.e.Xattrs {
		x[k] = v
	}
	x[opaqueXattr] = []byte("y")
	return x
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	v, ok := n.xattrs()[attr]
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) == 0 {
		return uint32(len(v)), 0
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	var list []byte
	for k := range n.xattrs() {
		list = append(append(list, k...), 0)
	}
	if len(dest) == 0 {
		return uint32(len(list)), 0
	}
	if len(dest) < len(list) {
		return uint32(len(list)), syscall.ERANGE
	}
	return uint32(copy(dest, list)), 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if n.e == nil || n.e.Type != "symlink" {
		return nil, syscall.EINVAL
	}
	return []byte(n.e.LinkName), 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.e != nil && n.l.Logger.Enabled(ctx, slog.LevelDebug) {
		// Which files a workload opens is what --prioritized-files wants.
		n.l.Logger.Debug("file opened", "layer", n.l.Name, "file", n.e.Name)
	}
	// Contents never change: let the kernel keep them in its page cache.
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if n.e == nil || n.e.Type != "reg" {
		return nil, syscall.EISDIR
	}
	size := n.e.Size
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	if int64(len(dest)) > size-off {
		dest = dest[:size-off]
	}
	// Every chunk the read touches, fetched together so that adjacent
	// missing chunks go out as one request.
	type part struct {
		c   blob.Chunk
		in  int64 // offset inside the chunk
		out int   // offset inside dest
		n   int
	}
	var parts []part
	var chunks []blob.Chunk
	for pos := off; pos < off+int64(len(dest)); {
		ce, ok := n.l.TOC.ChunkEntryForOffset(n.e.Name, pos)
		if !ok {
			n.l.Logger.Error("no chunk for offset", "layer", n.l.Name, "file", n.e.Name, "offset", pos)
			return nil, syscall.EIO
		}
		c := blob.ChunkOf(ce, size)
		in := pos - ce.ChunkOffset
		cnt := min(int64(len(dest))-(pos-off), c.Size-in)
		if cnt <= 0 {
			return nil, syscall.EIO
		}
		parts = append(parts, part{c: c, in: in, out: int(pos - off), n: int(cnt)})
		chunks = append(chunks, c)
		pos += cnt
	}
	// Files are mostly read from start to end (exec maps a whole binary):
	// fetch what follows in the same request, up to readAhead bytes, rather
	// than pay a round trip per page fault.
	for pos := off + int64(len(dest)); pos < size && pos < off+readAhead; {
		ce, ok := n.l.TOC.ChunkEntryForOffset(n.e.Name, pos)
		if !ok {
			break
		}
		c := blob.ChunkOf(ce, size)
		chunks = append(chunks, c)
		pos = ce.ChunkOffset + c.Size
	}
	if err := n.l.Chunks.Ensure(ctx, chunks, true); err != nil {
		n.l.Logger.Error("read failed", "layer", n.l.Name, "file", n.e.Name, "offset", off, "err", err)
		return nil, syscall.EIO
	}
	for _, p := range parts {
		got, err := n.l.Chunks.ReadAt(ctx, p.c, dest[p.out:p.out+p.n], p.in)
		if err != nil || got != p.n {
			if err == nil {
				err = errors.New("short read")
			}
			n.l.Logger.Error("read failed", "layer", n.l.Name, "file", n.e.Name, "offset", off, "err", err)
			return nil, syscall.EIO
		}
	}
	return fuse.ReadResultData(dest), 0
}

func (r *root) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = 4096
	out.Frsize = 4096
	out.Blocks = r.stats.blocks
	out.Files = r.stats.files
	out.NameLen = 255
	return 0
}
