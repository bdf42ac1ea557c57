package toc

import (
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

// ErrInvalid marks a TOC that is malformed, inconsistent or costs more than
// its Limits allow. Names that leave the layer match both ErrInvalid and
// ErrEscapes.
var ErrInvalid = errors.New("invalid TOC")

// ErrLossy marks a TOC that cannot show the layer exactly: JSON carries
// only UTF-8, and encoding a name with other bytes (which tar allows)
// replaces them with U+FFFD, so a name holding U+FFFD may not be the
// layer's. It matches ErrInvalid too; a caller that wants the layer
// exactly pulls it whole instead.
var ErrLossy = errors.New("TOC cannot represent the layer exactly")

// Default limits.
const (
	DefaultMaxTOCSize   = 64 << 20
	DefaultMaxEntries   = 1 << 18
	DefaultMaxChunkSize = 64 << 20
)

// Limits bound what a TOC may cost. Zero fields take the defaults.
type Limits struct {
	MaxTOCSize   int64 // decompressed TOC JSON bytes; default 64 MiB
	MaxEntries   int   // TOC entries, and names in the tree (implied directories count); default 1<<18
	MaxChunkSize int64 // a chunk's uncompressed Size, its Inner offset, and (with MaxSpan's overhead) its compressed span End-Offset; default 64 MiB
}

func (l Limits) withDefaults() Limits {
	if l.MaxTOCSize <= 0 {
		l.MaxTOCSize = DefaultMaxTOCSize
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxChunkSize <= 0 {
		l.MaxChunkSize = DefaultMaxChunkSize
	}
	// Far beyond any real layer, and small enough that sums of limits
	// cannot overflow.
	l.MaxTOCSize = min(l.MaxTOCSize, 1<<40)
	l.MaxChunkSize = min(l.MaxChunkSize, 1<<40)
	return l
}

// MaxSpan is the largest compressed span End-Offset a chunk may have. A
// compressed stream holds the chunk's bytes, those before it (Inner) and
// the tar headers of the entries that follow it up to the next stream; the
// overhead leaves room for the headers and for incompressible data, while
// still bounding what one chunk can make a reader fetch.
func (l Limits) MaxSpan() int64 {
	l = l.withDefaults()
	return l.MaxChunkSize + l.MaxChunkSize/8 + 1<<20
}

// Chunk is one verifiable unit of a layer: a range of a regular file's bytes.
type Chunk struct {
	FileOffset int64  // where the chunk starts in its file
	Offset     int64  // compressed offset of its stream in the blob
	End        int64  // end of that compressed stream in the blob (exclusive)
	Inner      int64  // offset of the chunk's bytes inside the decompressed stream
	Size       int64  // uncompressed size (>0)
	Digest     string // digest of the uncompressed bytes (sha256:...), always present
}

// Entry is one inode of the layer's tree. Hard links resolve to their
// target's *Entry. An Entry is read-only once built.
type Entry struct {
	Name               string // clean relative path without leading "./" or "/"; "" for the root
	Type               string // "dir", "reg", "symlink", "char", "block", "fifo"
	Mode               uint32 // permission bits plus setuid/setgid/sticky (mask 07777), exactly as the TOC says
	UID, GID           uint32
	Size               int64     // regular files only; 0 for other types
	ModTime            time.Time // as the TOC says; the Unix epoch when it says none (estargz writes none for the epoch)
	LinkName           string    // symlink target
	DevMajor, DevMinor uint32
	Xattrs             map[string][]byte
	Digest             string  // content digest of a regular file as the TOC gives it ("" if none)
	NumLink            uint32  // names pointing at this entry (1 + hard links); 2 + subdirectories for a directory
	Chunks             []Chunk // regular file: in file order, covering [0,Size) with no gap or overlap

	children []Dirent // sorted by name, directories only
	explicit bool     // set by a TOC entry, not created as an implicit parent
}

// Dirent is one name in a directory.
type Dirent struct {
	Name  string // base name
	Entry *Entry
}

// Children returns a directory's entries sorted by name; nil for non-dirs.
// The slice is shared: callers must not modify it.
func (e *Entry) Children() []Dirent { return e.children }

// Child finds a directory's entry by base name.
func (e *Entry) Child(name string) (*Entry, bool) {
	i := sort.Search(len(e.children), func(i int) bool { return e.children[i].Name >= name })
	if i < len(e.children) && e.children[i].Name == name {
		return e.children[i].Entry, true
	}
	return nil, false
}

// ChunkAt returns the index into e.Chunks of the chunk covering off, or -1.
func (e *Entry) ChunkAt(off int64) int {
	if off < 0 || off >= e.Size {
		return -1
	}
	i := sort.Search(len(e.Chunks), func(i int) bool { return e.Chunks[i].FileOffset > off }) - 1
	if i < 0 || off >= e.Chunks[i].FileOffset+e.Chunks[i].Size {
		return -1
	}
	return i
}

// Index is a validated TOC. It is read-only after Build or Load, and safe
// for concurrent use.
type Index struct {
	Root *Entry
	// TOCDigest is the digest of the decompressed TOC JSON, as estargz
	// computes it (the containerd.io/snapshot/stargz/toc.digest annotation).
	// Load sets it; Build leaves it empty.
	TOCDigest digest.Digest
	// TOCOffset is where the payload ends and the TOC's framing starts: the
	// footer's TOC offset for gzip, and 8 bytes (the skippable frame's
	// header) before the compressed TOC for zstd:chunked. No chunk's stream
	// reaches past it.
	TOCOffset  int64
	BlobSize   int64
	Landmark   int64 // blob offset of the ".prefetch.landmark" entry, -1 if none
	NoPrefetch bool  // ".no.prefetch.landmark" present
	Entries    int   // entries of the TOC ("chunk" entries included)

	files []*Entry // regular files with data, in TOC (and so blob) order
}

// Lookup finds an entry by its name relative to the root; "" is the root.
// Names are cleaned as estargz cleans them ("./a", "/a" and "a" are one).
func (ix *Index) Lookup(name string) (*Entry, bool) {
	name = cleanEntryName(name)
	e := ix.Root
	for name != "" {
		if e.Type != "dir" {
			return nil, false
		}
		var part string
		part, name, _ = strings.Cut(name, "/")
		var ok bool
		if e, ok = e.Child(part); !ok {
			return nil, false
		}
	}
	return e, true
}

// Chunks returns every chunk of the layer once, sorted by blob offset then
// Inner. The slice is the caller's.
func (ix *Index) Chunks() []Chunk {
	n := 0
	for _, f := range ix.files {
		n += len(f.Chunks)
	}
	out := make([]Chunk, 0, n)
	for _, f := range ix.files {
		out = append(out, f.Chunks...)
	}
	// Build keeps payloads in blob order, so this is already sorted; the
	// sort is a cheap guarantee for callers that binary-search the result.
	if !sort.SliceIsSorted(out, func(i, j int) bool { return chunkLess(out[i], out[j]) }) {
		sort.Slice(out, func(i, j int) bool { return chunkLess(out[i], out[j]) })
	}
	return out
}

func chunkLess(a, b Chunk) bool {
	if a.Offset != b.Offset {
		return a.Offset < b.Offset
	}
	return a.Inner < b.Inner
}

// Build validates a decoded TOC and indexes it. tocOffset is where the TOC
// (with its framing) starts in the blob: chunks' streams end there at the
// latest.
func Build(t *estargz.JTOC, tocOffset, blobSize int64, lim Limits) (*Index, error) {
	b, err := newBuilder(tocOffset, blobSize, lim)
	if err != nil {
		return nil, err
	}
	if t == nil {
		return nil, fmt.Errorf("%w: no TOC", ErrInvalid)
	}
	if len(t.Entries) > b.lim.MaxEntries {
		return nil, fmt.Errorf("%w: %d entries, more than the limit of %d", ErrInvalid, len(t.Entries), b.lim.MaxEntries)
	}
	for _, e := range t.Entries {
		if err := b.add(e); err != nil {
			return nil, err
		}
	}
	return b.finish()
}

// EntryError is a validation failure of one TOC entry.
type EntryError struct {
	Name  string // the entry's name as the TOC gives it
	Index int    // position in the TOC's entries
	Err   error  // matches ErrInvalid; also ErrEscapes for names out of the layer, ErrLossy for U+FFFD
}

func (e *EntryError) Error() string {
	if e.Name == "" && e.Index >= 0 {
		return fmt.Sprintf("TOC entry #%d: %v", e.Index, e.Err)
	}
	if len(e.Name) > 256 {
		// A log line, not a dump of a hostile name.
		return fmt.Sprintf("TOC entry %q... (%d bytes): %v", e.Name[:200], len(e.Name), e.Err)
	}
	return fmt.Sprintf("TOC entry %q: %v", e.Name, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

// reason is a validation failure's message; it matches its kinds with
// errors.Is without repeating them in the message.
type reason struct {
	msg   string
	kinds []error
}

func (r *reason) Error() string   { return r.msg }
func (r *reason) Unwrap() []error { return r.kinds }

func invalid(format string, args ...any) error {
	return &reason{msg: fmt.Sprintf(format, args...), kinds: []error{ErrInvalid}}
}

func lossy(what, s string) error {
	if !strings.ContainsRune(s, utf8.RuneError) {
		return nil
	}
	return &reason{msg: fmt.Sprintf("%s holds U+FFFD, what JSON makes of bytes that are not UTF-8", what), kinds: []error{ErrInvalid, ErrLossy}}
}

func escapes(format string, args ...any) error {
	return &reason{msg: fmt.Sprintf(format, args...) + " " + ErrEscapes.Error(), kinds: []error{ErrInvalid, ErrEscapes}}
}

// pendingChunk is a chunk whose stream's end is not known yet: the next
// stream's offset, or the TOC's.
type pendingChunk struct {
	e    *Entry
	i    int
	name string
	idx  int
}

// builder indexes TOC entries one at a time, so that Load never holds the
// whole decoded TOC: memory stays proportional to what the index keeps.
type builder struct {
	lim      Limits
	maxSpan  int64
	ix       *Index
	kids     map[dirKey]*Entry
	nodes    int // names in the tree
	implicit int // directories created as parents, no entry naming them
	// the directory of the last entry, and its name; the last directory
	// an entry named
	lastDir     *Entry
	lastDirName string
	lastNew     *Entry
	dirs        []*Entry
	idx         int // index of the next TOC entry
	cur         *Entry
	curName     string // name of cur as the TOC gave it, for errors
	curIdx      int    // index of cur's entry
	covered     int64  // bytes of cur covered by chunks so far
	lastOff     int64  // offset of the last chunk's stream, -1 before the first
	lastInner   int64  // Inner+Size of the last chunk in that stream
	pending     []pendingChunk
}

func newBuilder(tocOffset, blobSize int64, lim Limits) (*builder, error) {
	lim = lim.withDefaults()
	if tocOffset < 0 || blobSize < 0 || tocOffset > blobSize {
		return nil, fmt.Errorf("%w: TOC offset %d outside the %d byte blob", ErrInvalid, tocOffset, blobSize)
	}
	root := &Entry{Type: "dir", Mode: 0o755, ModTime: time.Unix(0, 0).UTC()}
	b := &builder{
		lim:     lim,
		maxSpan: lim.MaxSpan(),
		ix:      &Index{Root: root, TOCOffset: tocOffset, BlobSize: blobSize, Landmark: -1},
		kids:    map[dirKey]*Entry{},
		dirs:    []*Entry{root},
		lastOff: -1,
	}
	return b, nil
}

// types interns type names, so that a million entries share eight strings.
var types = map[string]string{"dir": "dir", "reg": "reg", "symlink": "symlink", "char": "char", "block": "block", "fifo": "fifo", "hardlink": "hardlink", "chunk": "chunk"}

func (b *builder) add(te *estargz.TOCEntry) error {
	idx := b.idx
	b.idx++
	if idx >= b.lim.MaxEntries {
		return fmt.Errorf("%w: more than the limit of %d entries", ErrInvalid, b.lim.MaxEntries)
	}
	if te == nil {
		return &EntryError{Index: idx, Err: invalid("null entry")}
	}
	if te.Type == "chunk" {
		if b.cur == nil {
			return &EntryError{Name: te.Name, Index: idx, Err: invalid("chunk entry that does not follow a regular file")}
		}
		return entryError(b.curName, idx, b.addChunk(te, idx))
	}
	if err := b.endFile(); err != nil {
		return err
	}
	return entryError(te.Name, idx, b.addEntry(te, idx))
}

// entryError names the entry in err, unless err names one already.
func entryError(name string, idx int, err error) error {
	var ee *EntryError
	if err == nil || errors.As(err, &ee) {
		return err
	}
	return &EntryError{Name: name, Index: idx, Err: err}
}

func (b *builder) addEntry(te *estargz.TOCEntry, idx int) error {
	if err := checkName(te.Name); err != nil {
		return err
	}
	name := cleanEntryName(te.Name)
	if err := checkComponents(name); err != nil {
		return err
	}
	if err := lossy("name", name); err != nil {
		return err
	}
	typ, ok := types[te.Type]
	if !ok || typ == "chunk" {
		return invalid("unknown type %q", te.Type)
	}
	parent, base, err := b.parent(name)
	if err != nil {
		return err
	}
	if typ == "hardlink" {
		return b.addHardlink(te, name, parent, base)
	}
	e, exists := b.ix.Root, true
	if name != "" {
		e, exists = b.kids[dirKey{parent, base}]
	}
	switch {
	case exists && typ == "dir" && e.Type == "dir" && !e.explicit:
		// A directory created as the parent of an earlier entry: this
		// entry gives it its metadata, as estargz does.
	case exists && name == "" && typ != "dir":
		return invalid("root entry of type %q", typ)
	case exists:
		return invalid("duplicate entry (a %s of that name exists)", e.Type)
	default:
		e = &Entry{Name: name}
	}
	if err := fill(e, te, typ); err != nil {
		return err
	}
	if !exists {
		if err := b.link(parent, base, e); err != nil {
			return err
		}
	}
	if typ == "dir" {
		b.lastNew = e
	}
	if name == estargz.PrefetchLandmark {
		// Its offset marks the end of the prioritized region, whatever its
		// size; a landmark without data keeps no meaningful offset.
		if typ == "reg" && te.Size > 0 {
			b.ix.Landmark = te.Offset
		}
	}
	if name == estargz.NoPrefetchLandmark {
		b.ix.NoPrefetch = true
	}
	if typ == "reg" {
		return b.startFile(e, te, idx)
	}
	return nil
}

// fill sets e's metadata from te.
func fill(e *Entry, te *estargz.TOCEntry, typ string) error {
	e.Type = typ
	e.explicit = true
	e.NumLink = 1 // directories get theirs once the tree is complete
	e.Mode = uint32(te.Mode & 0o7777)
	if te.UID < 0 || int64(te.UID) > 1<<32-1 || te.GID < 0 || int64(te.GID) > 1<<32-1 {
		return invalid("owner %d:%d out of range", te.UID, te.GID)
	}
	e.UID, e.GID = uint32(te.UID), uint32(te.GID)
	e.ModTime = time.Unix(0, 0).UTC()
	if te.ModTime3339 != "" {
		t, err := time.Parse(time.RFC3339, te.ModTime3339)
		if err != nil {
			return invalid("modification time %q: %v", te.ModTime3339, err)
		}
		e.ModTime = t
	}
	switch typ {
	case "symlink":
		if te.LinkName == "" {
			return invalid("symlink with an empty target")
		}
		if strings.IndexByte(te.LinkName, 0) >= 0 {
			return invalid("symlink target with a NUL byte")
		}
		if len(te.LinkName) >= pathMax {
			return invalid("symlink target of %d bytes, longer than PATH_MAX", len(te.LinkName))
		}
		if err := lossy("symlink target", te.LinkName); err != nil {
			return err
		}
		e.LinkName = te.LinkName
	case "char", "block":
		if te.DevMajor < 0 || int64(te.DevMajor) > 1<<32-1 || te.DevMinor < 0 || int64(te.DevMinor) > 1<<32-1 {
			return invalid("device %d:%d out of range", te.DevMajor, te.DevMinor)
		}
		e.DevMajor, e.DevMinor = uint32(te.DevMajor), uint32(te.DevMinor)
	case "reg":
		if te.Size < 0 {
			return invalid("negative size %d", te.Size)
		}
		e.Size = te.Size
		if te.Digest != "" {
			if _, err := digest.Parse(te.Digest); err != nil {
				return invalid("content digest %q: %v", te.Digest, err)
			}
			e.Digest = te.Digest
		}
	}
	if len(te.Xattrs) > 0 {
		e.Xattrs = make(map[string][]byte, len(te.Xattrs))
		for k, v := range te.Xattrs {
			// What Linux can store: overlayfs could never show more.
			if k == "" || len(k) > 255 || strings.IndexByte(k, 0) >= 0 {
				return invalid("xattr name %q", k)
			}
			if err := lossy("xattr name", k); err != nil {
				return err
			}
			if len(v) > 64<<10 {
				return invalid("xattr %q of %d bytes, more than 65536", k, len(v))
			}
			e.Xattrs[k] = append([]byte(nil), v...)
		}
	}
	return nil
}

func (b *builder) addHardlink(te *estargz.TOCEntry, name string, parent *Entry, base string) error {
	if err := checkName(te.LinkName); err != nil {
		return fmt.Errorf("hardlink target %q: %w", te.LinkName, err)
	}
	if name == "" {
		return invalid("root entry of type \"hardlink\"")
	}
	if err := lossy("hardlink target", te.LinkName); err != nil {
		return err
	}
	if _, exists := b.kids[dirKey{parent, base}]; exists {
		return invalid("duplicate entry (hardlink over an existing name)")
	}
	org, ok := b.find(cleanEntryName(te.LinkName))
	if !ok {
		return invalid("hardlink to %q, which no earlier entry names", te.LinkName)
	}
	if org.Type == "dir" {
		return invalid("hardlink to the directory %q", te.LinkName)
	}
	if org.NumLink == 1<<32-1 {
		return invalid("too many hardlinks to %q", te.LinkName)
	}
	if err := b.link(parent, base, org); err != nil {
		return err
	}
	org.NumLink++
	return nil
}

// dirKey names an entry by its directory and base name. Walking names
// component by component, rather than hashing every prefix of a path,
// keeps the cost of a name proportional to its length however deep it is.
type dirKey struct {
	dir  *Entry
	name string
}

// link adds e to dir under base.
func (b *builder) link(dir *Entry, base string, e *Entry) error {
	// Implicit directories are names no entry paid for: they count
	// against the same limit, so that a deep name cannot multiply memory.
	if b.nodes >= b.lim.MaxEntries {
		return invalid("more than %d names (entries and the directories they imply)", b.lim.MaxEntries)
	}
	b.nodes++
	b.kids[dirKey{dir, base}] = e
	dir.children = append(dir.children, Dirent{Name: base, Entry: e})
	if e.Type == "dir" {
		b.dirs = append(b.dirs, e)
	}
	return nil
}

// parent returns the directory that holds name (a clean, non-root name)
// and name's base, creating missing parents as estargz does (0755,
// root-owned), without recursion.
func (b *builder) parent(name string) (*Entry, string, error) {
	if name == "" {
		return nil, "", nil
	}
	// Tar order keeps a directory's entries together, and puts a
	// directory right before its entries: the directory of the previous
	// entry, or the previous entry, is most often this one's.
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		dir, base := name[:i], name[i+1:]
		if b.lastDir != nil && dir == b.lastDirName {
			return b.lastDir, base, nil
		}
		if b.lastNew != nil && dir == b.lastNew.Name {
			b.lastDir, b.lastDirName = b.lastNew, dir
			return b.lastNew, base, nil
		}
	}
	cur := b.ix.Root
	for start := 0; ; {
		i := strings.IndexByte(name[start:], '/')
		if i < 0 {
			b.lastDir, b.lastDirName = cur, name[:max(start-1, 0)]
			return cur, name[start:], nil
		}
		comp, prefix := name[start:start+i], name[:start+i]
		next, ok := b.kids[dirKey{cur, comp}]
		switch {
		case !ok:
			// A TOC usually names its directories; one that leaves them
			// implicit (Bazel's pkg_tar does) still pays for most of them
			// with entries: a tree holds fewer directories than files.
			// The slack covers a single file at PATH_MAX depth.
			if b.implicit >= 4*(b.nodes-b.implicit)+pathMax {
				return nil, "", invalid("%d directories implied by %d entries", b.implicit+1, b.nodes-b.implicit)
			}
			b.implicit++
			next = &Entry{Name: prefix, Type: "dir", Mode: 0o755, ModTime: time.Unix(0, 0).UTC()}
			if err := b.link(cur, comp, next); err != nil {
				return nil, "", err
			}
		case next.Type == "symlink":
			return nil, "", &reason{msg: fmt.Sprintf("under %q, a symlink (a symlink out of the layer)", prefix), kinds: []error{ErrInvalid, ErrEscapes}}
		case next.Type != "dir":
			return nil, "", invalid("under %q, which is a %s, not a directory", prefix, next.Type)
		}
		cur = next
		start += i + 1
	}
}

// find looks a clean name up among the entries so far.
func (b *builder) find(name string) (*Entry, bool) {
	cur := b.ix.Root
	for name != "" {
		if cur.Type != "dir" {
			return nil, false
		}
		var comp string
		comp, name, _ = strings.Cut(name, "/")
		var ok bool
		if cur, ok = b.kids[dirKey{cur, comp}]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// startFile begins the chunks of a regular file: the "reg" entry is its
// first chunk, "chunk" entries that follow it are the others.
func (b *builder) startFile(e *Entry, te *estargz.TOCEntry, idx int) error {
	if e.Size == 0 {
		// Empty files have no payload; the TOC's offsets for them mean
		// nothing and are ignored, as estargz ignores them.
		return nil
	}
	b.cur, b.curName, b.curIdx, b.covered = e, te.Name, idx, 0
	b.ix.files = append(b.ix.files, e)
	return b.addChunk(te, idx)
}

func (b *builder) addChunk(te *estargz.TOCEntry, idx int) error {
	e := b.cur
	if e.Size == 0 {
		return invalid("chunk of an empty file")
	}
	if te.ChunkOffset != b.covered {
		if b.covered >= e.Size {
			return invalid("chunk at file offset %d past the end of the %d byte file", te.ChunkOffset, e.Size)
		}
		return invalid("chunk at file offset %d, want %d (a gap or an overlap)", te.ChunkOffset, b.covered)
	}
	size := te.ChunkSize
	if size == 0 {
		size = e.Size - te.ChunkOffset // zero means: to the end of the file
	}
	if size <= 0 {
		if b.covered == e.Size {
			return invalid("chunk at file offset %d past the end of the %d byte file", te.ChunkOffset, e.Size)
		}
		return invalid("chunk at file offset %d with size %d", te.ChunkOffset, size)
	}
	if size > b.lim.MaxChunkSize {
		return invalid("chunk at file offset %d of %d bytes, more than the limit of %d", te.ChunkOffset, size, b.lim.MaxChunkSize)
	}
	if size > e.Size-b.covered {
		return invalid("chunk at file offset %d of %d bytes ends past the %d byte file", te.ChunkOffset, size, e.Size)
	}
	if te.InnerOffset < 0 || te.InnerOffset > b.lim.MaxChunkSize {
		return invalid("chunk at file offset %d with inner offset %d outside [0, %d]", te.ChunkOffset, te.InnerOffset, b.lim.MaxChunkSize)
	}
	if te.Offset < 0 || te.Offset >= b.ix.TOCOffset {
		return invalid("chunk at %d starts outside the payload [0, %d)", te.Offset, b.ix.TOCOffset)
	}
	switch {
	case te.Offset < b.lastOff:
		return invalid("chunk at %d goes backwards (after a chunk at %d)", te.Offset, b.lastOff)
	case te.Offset == b.lastOff && te.InnerOffset < b.lastInner:
		return invalid("chunk at %d with inner offset %d overlaps the previous one in its stream (ends at %d)", te.Offset, te.InnerOffset, b.lastInner)
	}
	dg := te.ChunkDigest
	if dg == "" && te.ChunkOffset == 0 && size == e.Size {
		// A file in one chunk: its content digest is the chunk's, which
		// is how estargz verifies TOCs written without chunk digests.
		dg = e.Digest
	}
	if dg == "" {
		return invalid("chunk at file offset %d without a digest", te.ChunkOffset)
	}
	if _, err := digest.Parse(dg); err != nil {
		return invalid("chunk digest %q: %v", dg, err)
	}
	if te.Offset > b.lastOff {
		if err := b.closeStreams(te.Offset); err != nil {
			return err
		}
	}
	b.lastOff, b.lastInner = te.Offset, te.InnerOffset+size
	e.Chunks = append(e.Chunks, Chunk{FileOffset: b.covered, Offset: te.Offset, Inner: te.InnerOffset, Size: size, Digest: dg})
	b.pending = append(b.pending, pendingChunk{e: e, i: len(e.Chunks) - 1, name: b.curName, idx: idx})
	b.covered += size
	return nil
}

// closeStreams ends the pending chunks' stream at end.
func (b *builder) closeStreams(end int64) error {
	for _, p := range b.pending {
		c := &p.e.Chunks[p.i]
		c.End = end
		if end-c.Offset > b.maxSpan {
			return &EntryError{Name: p.name, Index: p.idx, Err: invalid("chunk at %d spans %d compressed bytes (to %d), more than the limit of %d", c.Offset, end-c.Offset, end, b.maxSpan)}
		}
	}
	b.pending = b.pending[:0]
	return nil
}

// endFile checks that the current file's chunks cover it.
func (b *builder) endFile() error {
	if b.cur == nil {
		return nil
	}
	e := b.cur
	b.cur = nil
	if b.covered != e.Size {
		return &EntryError{Name: b.curName, Index: b.curIdx, Err: invalid("chunks cover %d of the file's %d bytes", b.covered, e.Size)}
	}
	return nil
}

func (b *builder) finish() (*Index, error) {
	if err := b.endFile(); err != nil {
		return nil, err
	}
	if err := b.closeStreams(b.ix.TOCOffset); err != nil {
		return nil, err
	}
	if b.ix.Landmark >= b.ix.TOCOffset {
		return nil, &EntryError{Name: estargz.PrefetchLandmark, Index: -1, Err: invalid("landmark at %d outside the payload [0, %d)", b.ix.Landmark, b.ix.TOCOffset)}
	}
	for _, d := range b.dirs {
		// "." and the parent's entry, plus each subdirectory's "..".
		n := uint32(2)
		for _, c := range d.children {
			if c.Entry.Type == "dir" {
				n++
			}
		}
		d.NumLink = n
		sort.Slice(d.children, func(i, j int) bool { return d.children[i].Name < d.children[j].Name })
	}
	b.ix.Entries = b.idx
	ix := b.ix
	b.ix = nil
	return ix, nil
}

// cleanEntryName is estargz's: names are relative to the root.
func cleanEntryName(name string) string {
	if isClean(name) {
		return name // the common case, without copying a long name
	}
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// isClean reports whether name is relative with no empty, "." or ".."
// component: what path.Clean leaves unchanged.
func isClean(name string) bool {
	for rest := name; rest != ""; {
		var part string
		var more bool
		part, rest, more = strings.Cut(rest, "/")
		if part == "" || part == "." || part == ".." || more && rest == "" {
			return false
		}
	}
	return true
}

// pathMax is Linux's PATH_MAX: a layer's tar with a longer name cannot be
// unpacked either (containerd creates files by their full path).
const pathMax = 4096

// checkComponents refuses a name Linux could not hold.
func checkComponents(name string) error {
	if len(name) >= pathMax {
		return invalid("name of %d bytes, longer than PATH_MAX", len(name))
	}
	for rest := name; rest != ""; {
		var part string
		part, rest, _ = strings.Cut(rest, "/")
		if len(part) > 255 {
			return invalid("name component of %d bytes, more than 255", len(part))
		}
	}
	return nil
}
