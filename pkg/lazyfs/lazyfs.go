// Package lazyfs is the FUSE view of lazily read layers: the exact POSIX
// tree that overlayfs needs of a lower directory, built from each layer's
// TOC, with file contents read chunk by chunk on first read.
//
// One FUSE mount serves every layer of the node, each layer a directory
// under its root that the snapshotter bind-mounts where containerd wants
// it. A mount per layer would cost a kernel connection, its reader threads
// (go-fuse keeps up to GOMAXPROCS of them blocked in read(2) per mount) and
// their buffers for every layer: a node with a thousand layers would run
// into Go's thread limit. One server's threads are bounded however many
// layers there are.
package lazyfs

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/starling-dev/starling/pkg/toc"
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

// readAhead is how far past a read the chunks of the same file are fetched
// after it: files are mostly read from start to end (exec maps a whole
// binary), and a round trip per page fault would be slow.
const readAhead = 4 << 20

// attrTimeout is long because a layer never changes.
const attrTimeout = time.Hour

// Chunks is what the filesystem reads file contents through (pkg/blob's
// Reader).
type Chunks interface {
	// Ensure fetches what a reader waits on: exactly cs.
	Ensure(ctx context.Context, cs []toc.Chunk) error
	// ReadAt reads part of chunk c, fetching it again if it was evicted.
	ReadAt(ctx context.Context, c toc.Chunk, p []byte, off int64) (int, error)
	// ReadAhead starts fetching cs without waiting.
	ReadAhead(cs []toc.Chunk)
	// LocalFile opens a file whose bytes are all local as one file, for
	// passthrough; ok=false otherwise.
	LocalFile(e *toc.Entry) (*os.File, bool)
}

// Layer is what the filesystem shows of one layer.
type Layer struct {
	Index  *toc.Index
	Chunks Chunks
	Name   string // the layer's digest, for logs
	Logger *slog.Logger
}

// Options configures the filesystem.
type Options struct {
	// Passthrough lets the kernel read files whose bytes are all local
	// straight from the chunk store.
	Passthrough bool
	Logger      *slog.Logger
}

// FS is the mounted filesystem of all lazy layers.
type FS struct {
	dir    string
	srv    *fuse.Server
	root   *rootNode
	log    *slog.Logger
	passth bool

	mu     sync.Mutex
	layers map[string]*fs.Inode
}

// rootNode is the mount's root: one directory per layer.
type rootNode struct {
	fs.Inode
	fsys *FS
}

var (
	_ fs.NodeStatfser  = (*rootNode)(nil)
	_ fs.NodeGetattrer = (*rootNode)(nil)
)

func (r *rootNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o711
	out.Nlink = 2
	return 0
}

func (r *rootNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = 4096
	out.Frsize = 4096
	out.NameLen = 255
	return 0
}

// Mount mounts the filesystem at dir, clearing a mount a dead daemon left
// there. The caller ends it with Unmount.
func Mount(dir string, o Options) (*FS, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("lazy filesystem at %s: %w", dir, err)
	}
	_ = unix.Unmount(dir, unix.MNT_DETACH)
	f := &FS{dir: dir, log: o.Logger, layers: map[string]*fs.Inode{}}
	f.root = &rootNode{fsys: f}
	timeout := attrTimeout
	opts := &fs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		// Report modes exactly as the image has them: without this a file
		// with mode 0000 would show as 0644.
		NullPermissions: true,
		MountOptions: fuse.MountOptions{
			AllowOther: true,
			FsName:     "starling",
			Name:       "starling",
			// The kernel checks permissions from the modes we report, as it
			// would for a local lower directory.
			Options:      []string{"ro", "default_permissions"},
			MaxReadAhead: 1 << 20,
			PanicHandler: func(p any) fuse.Status {
				o.Logger.Error("panic in a filesystem request", "panic", p, "stack", string(debug.Stack()))
				return fuse.EIO
			},
		},
	}
	srv, err := fs.Mount(dir, f.root, opts)
	if err != nil {
		return nil, fmt.Errorf("lazy filesystem at %s: %w", dir, err)
	}
	f.srv = srv
	if o.Passthrough {
		f.passth = probePassthrough(srv, dir)
	}
	mode := "fuse reads"
	if f.passth {
		mode = "passthrough for local files"
	}
	o.Logger.Info("lazy filesystem mounted", "dir", dir, "mode", mode)
	return f, nil
}

// probePassthrough asks the kernel to register a backing file, as go-fuse
// will for every passthrough open: where that fails (old kernel, missing
// capability) files are served through FUSE reads.
func probePassthrough(srv *fuse.Server, dir string) bool {
	tmp, err := os.CreateTemp("", "starling-passthrough-*")
	if err != nil {
		return false
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	id, errno := srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(tmp.Fd())})
	if errno != 0 {
		return false
	}
	srv.UnregisterBackingFd(id)
	return true
}

// Dir is where the filesystem is mounted.
func (f *FS) Dir() string { return f.dir }

// Passthrough reports whether local files are served by the kernel.
func (f *FS) Passthrough() bool { return f.passth }

// Add shows layer l as the directory id under the mount and returns its
// path.
func (f *FS) Add(id string, l *Layer) (string, error) {
	if l.Logger == nil {
		l.Logger = slog.Default()
	}
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." {
		return "", fmt.Errorf("layer %s: bad directory name %q", l.Name, id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.layers[id]; ok {
		return "", fmt.Errorf("layer %s: %s is shown already", l.Name, id)
	}
	in := f.build(l)
	f.root.AddChild(id, in, true)
	f.layers[id] = in
	// A lookup of the name before it existed may be cached as negative.
	_ = f.root.NotifyEntry(id)
	return f.dir + "/" + id, nil
}

// Remove takes the layer id out of the mount. Files of it that are still
// open keep working as far as their bytes are local.
func (f *FS) Remove(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.layers[id]; !ok {
		return
	}
	delete(f.layers, id)
	f.root.RmChild(id)
	_ = f.root.NotifyEntry(id)
}

// Unmount unmounts the filesystem, detaching it when containers still use
// it so that the daemon can stop.
func (f *FS) Unmount() error {
	err := f.srv.Unmount()
	if err != nil {
		if derr := unix.Unmount(f.dir, unix.MNT_DETACH); derr == nil {
			err = nil
		}
	}
	f.srv.Wait()
	if err != nil {
		return fmt.Errorf("unmount lazy filesystem %s: %w", f.dir, err)
	}
	return nil
}

// node is one inode of a layer's tree.
type node struct {
	fs.Inode
	fsys     *FS
	l        *Layer
	e        *toc.Entry // nil for whiteouts
	whiteout bool
	opaque   bool
	nlink    uint32 // directories: 2 + subdirectories, as a local filesystem counts

	mu                          sync.Mutex
	openCached, openPassthrough int // open handles by the kernel's I/O mode
}

var (
	_ fs.NodeGetattrer   = (*node)(nil)
	_ fs.NodeGetxattrer  = (*node)(nil)
	_ fs.NodeListxattrer = (*node)(nil)
	_ fs.NodeReadlinker  = (*node)(nil)
	_ fs.NodeOpener      = (*node)(nil)
	_ fs.NodeFlusher     = (*node)(nil)
	_ fs.NodeReader      = (*node)(nil)
	_ fs.NodeStatfser    = (*node)(nil)
)

// build makes the inodes of a layer's tree, without recursion: a TOC may
// nest directories as deep as PATH_MAX allows.
func (f *FS) build(l *Layer) *fs.Inode {
	ctx := context.Background()
	top := &node{fsys: f, l: l, e: l.Index.Root}
	topIn := f.root.NewPersistentInode(ctx, top, fs.StableAttr{Mode: syscall.S_IFDIR})
	inodes := map[*toc.Entry]*fs.Inode{}
	type job struct {
		n   *node
		in  *fs.Inode
		top bool
	}
	stack := []job{{top, topIn, true}}
	for len(stack) > 0 {
		j := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		j.n.nlink = 2
		for _, d := range j.n.e.Children() {
			base, e := d.Name, d.Entry
			switch {
			case j.top && metaFiles[base]:
				continue
			case base == opaqueWhiteout:
				j.n.opaque = true
				continue
			case strings.HasPrefix(base, whiteoutPrefix):
				wh := &node{fsys: f, l: l, whiteout: true}
				j.in.AddChild(base[len(whiteoutPrefix):], j.in.NewPersistentInode(ctx, wh, fs.StableAttr{Mode: syscall.S_IFCHR}), true)
				continue
			}
			if in, ok := inodes[e]; ok {
				// A hard link: the same inode under another name.
				j.in.AddChild(base, in, true)
				continue
			}
			n := &node{fsys: f, l: l, e: e}
			in := j.in.NewPersistentInode(ctx, n, fs.StableAttr{Mode: fileType(e)})
			inodes[e] = in
			j.in.AddChild(base, in, true)
			if e.Type == "dir" {
				j.n.nlink++
				stack = append(stack, job{n, in, false})
			}
		}
	}
	return topIn
}

func fileType(e *toc.Entry) uint32 {
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
	a.Blksize = 4096
	if n.whiteout {
		// overlayfs reads a 0/0 character device in a lower layer as a whiteout.
		a.Mode = syscall.S_IFCHR
		a.Nlink = 1
		return 0
	}
	e := n.e
	a.Mode = fileType(e) | e.Mode&0o7777
	a.Uid, a.Gid = e.UID, e.GID
	a.Nlink = max(e.NumLink, 1)
	switch e.Type {
	case "reg":
		a.Size = uint64(e.Size)
	case "symlink":
		a.Size = uint64(len(e.LinkName))
	case "char", "block":
		a.Rdev = uint32(unix.Mkdev(e.DevMajor, e.DevMinor))
	case "dir":
		a.Size = 4096
		a.Nlink = n.nlink
	}
	a.Blocks = (a.Size + 511) / 512
	mt := unpackedTime(e.ModTime)
	a.SetTimes(&mt, &mt, &mt)
	return 0
}

// Times outside what a local filesystem's unpack keeps: containerd's
// unpack sets times before 1970 or past 2262 (and eStargz's "no time",
// which it writes for 1970 itself) to the epoch, so the lazy view must too.
var (
	minTime = time.Unix(0, 0)
	maxTime = time.Unix(0, 0).Add(1<<63 - 1)
)

func unpackedTime(t time.Time) time.Time {
	if t.Before(minTime) || t.After(maxTime) {
		return minTime
	}
	return t
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = 4096
	out.Frsize = 4096
	out.NameLen = 255
	if n.l != nil && n.l.Index != nil {
		out.Files = uint64(n.l.Index.Entries)
	}
	return 0
}

// xattrs are the entry's extended attributes as an unpacked layer has
// them. containerd's unpack never sets trusted.* attributes from a layer,
// and neither may we: overlayfs reads trusted.overlay.* of its lower
// layers (opaque, redirect, origin), so a layer that could set them could
// reshape the container's tree. The kernel allows user.* only on regular
// files and directories, so a local filesystem cannot hold them on
// anything else either. The one attribute added is the opaque marker that
// the layer's own opaque whiteout stands for.
func (n *node) xattrs() map[string][]byte {
	if n.e == nil {
		return nil
	}
	userOK := n.e.Type == "reg" || n.e.Type == "dir"
	drop := func(k string) bool {
		return strings.HasPrefix(k, "trusted.") || (!userOK && strings.HasPrefix(k, "user."))
	}
	x := n.e.Xattrs
	filter := n.opaque
	for k := range x {
		if drop(k) {
			filter = true
			break
		}
	}
	if !filter {
		return x
	}
	out := make(map[string][]byte, len(x)+1)
	for k, v := range x {
		if !drop(k) {
			out[k] = v
		}
	}
	if n.opaque {
		out[opaqueXattr] = []byte("y")
	}
	return out
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

// The kernel keeps one I/O mode per inode: an open with passthrough fails
// (EIO) while the inode is open in caching mode, and the reverse too. A
// file opened before its bytes were local (exec maps it for as long as the
// program runs) must go on being opened in caching mode until every such
// open is released, and the other way round. openHandle counts them; its
// Release comes when the kernel has let go of the file.
type openHandle struct {
	n           *node
	f           *os.File // the backing file of a passthrough open
	passthrough bool
}

var (
	_ fs.FilePassthroughFder = (*openHandle)(nil)
	_ fs.FileReleaser        = (*openHandle)(nil)
)

func (h *openHandle) PassthroughFd() (int, bool) {
	if h.f == nil {
		return 0, false
	}
	return int(h.f.Fd()), true
}

func (h *openHandle) Release(ctx context.Context) syscall.Errno {
	h.n.mu.Lock()
	if h.passthrough {
		h.n.openPassthrough--
	} else {
		h.n.openCached--
	}
	h.n.mu.Unlock()
	if h.f != nil {
		// The kernel holds its own reference to a registered backing file.
		h.f.Close()
	}
	return 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.e == nil {
		return nil, 0, syscall.EIO
	}
	if n.l.Logger.Enabled(ctx, slog.LevelDebug) {
		// Which files a workload opens is what --prioritized-files wants.
		n.l.Logger.Debug("file opened", "layer", n.l.Name, "file", n.e.Name)
	}
	if !n.fsys.passth || n.e.Type != "reg" {
		// Contents never change: let the kernel keep them in its page cache.
		return nil, fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH, 0
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.openCached == 0 {
		if f, ok := n.l.Chunks.LocalFile(n.e); ok {
			n.openPassthrough++
			return &openHandle{n: n, f: f, passthrough: true}, fuse.FOPEN_NOFLUSH, 0
		}
		if n.openPassthrough > 0 {
			// Passthrough opens are live but the local file is gone
			// (evicted): direct I/O takes no inode mode, so it cannot
			// clash with them.
			return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_NOFLUSH, 0
		}
	}
	n.openCached++
	return &openHandle{n: n}, fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH, 0
}

// Flush answers ENOSYS, so the kernel stops sending FLUSH on close: a
// read-only file has nothing to flush, and each FLUSH would be a
// synchronous round trip to the daemon on every close(2).
func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno { return syscall.ENOSYS }

func (n *node) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if n.e == nil || n.e.Type != "reg" {
		return nil, syscall.EISDIR
	}
	e := n.e
	if off >= e.Size {
		return fuse.ReadResultData(nil), 0
	}
	if int64(len(dest)) > e.Size-off {
		dest = dest[:e.Size-off]
	}
	first := e.ChunkAt(off)
	if first < 0 {
		n.l.Logger.Error("no chunk for offset", "layer", n.l.Name, "file", e.Name, "offset", off)
		return nil, syscall.EIO
	}
	end := off + int64(len(dest))
	last := first
	for last+1 < len(e.Chunks) && e.Chunks[last+1].FileOffset < end {
		last++
	}
	need := e.Chunks[first : last+1]
	// The read waits for exactly the chunks that cover it; what follows is
	// asked for once they are here, so it never delays them.
	if err := n.l.Chunks.Ensure(ctx, need); err != nil {
		// The fetch that failed logged its cause with the layer and chunk.
		n.l.Logger.Debug("read failed", "layer", n.l.Name, "file", e.Name, "offset", off, "err", err)
		return nil, syscall.EIO
	}
	for i := range need {
		c := &need[i]
		from := max(off, c.FileOffset)
		to := min(end, c.FileOffset+c.Size)
		got, err := n.l.Chunks.ReadAt(ctx, *c, dest[from-off:to-off], from-c.FileOffset)
		if err != nil || int64(got) != to-from {
			if err == nil {
				err = fmt.Errorf("short read of chunk %s: %d of %d bytes", c.Digest, got, to-from)
			}
			n.l.Logger.Error("read failed", "layer", n.l.Name, "file", e.Name, "offset", off, "err", err)
			return nil, syscall.EIO
		}
	}
	if last+1 < len(e.Chunks) {
		var ahead []toc.Chunk
		for i := last + 1; i < len(e.Chunks) && e.Chunks[i].FileOffset < end+readAhead; i++ {
			ahead = append(ahead, e.Chunks[i])
		}
		n.l.Chunks.ReadAhead(ahead)
	}
	return fuse.ReadResultData(dest), 0
}
