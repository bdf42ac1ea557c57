// Package chunkcache keeps verified, decompressed chunks of lazily read
// layers on disk, keyed by chunk digest, so that a chunk shared by several
// layers and images is stored once on the node and survives a daemon restart.
//
// The directory holds dir/<hex[:2]>/<hex>, one file per chunk. An in-memory
// index (digest → size, LRU position, open file) is the single authority on
// what is cached: it is rebuilt from the directory at Open, and every hit of
// the read path (ReadAt) and every Put makes a chunk most recently used.
// Put makes room before it writes, so the bytes held never exceed the quota,
// not even for a moment and not under concurrent Puts.
package chunkcache

import (
	"container/list"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var (
	// ErrTooLarge is returned by Put for a chunk bigger than the whole quota.
	ErrTooLarge = errors.New("chunk larger than the cache quota")
	// ErrFull is returned by Put when the quota cannot be met because the
	// chunks that would have to go are pinned.
	ErrFull = errors.New("chunk cache full of pinned chunks")
	// ErrClosed is returned by Put after Close.
	ErrClosed = errors.New("chunk cache closed")
)

const (
	// maxOpenFiles bounds the descriptors kept open for hot chunks. Reopening
	// a chunk file on every read costs two syscalls and a path walk, which
	// dominates a small cached read.
	maxOpenFiles = 512
	// touchEvery is how often a hit also sets the file's mtime, which is
	// what orders the index rebuilt after a restart. Rarely enough that the
	// syscall does not show on the read path.
	touchEvery = time.Hour
	// openMarker exists while a Cache has the directory open; finding it at
	// Open means the last user did not Close (a crash).
	openMarker = ".open"
	// crashWindow is how far back from the newest chunk the files are
	// checked after a crash: chunks are written without fsync, and the
	// kernel writes dirty data back within about 30 s.
	crashWindow = 2 * time.Minute
	// lowWaterPercent is where eviction stops once it has to start, so that
	// a full cache does not evict on every Put.
	lowWaterPercent = 90
)

// Stats are the cache's counters since Open.
type Stats struct {
	Hits      int64 // ReadAt and Get calls served from the cache
	Misses    int64 // ReadAt and Get calls that found nothing (or a broken file)
	Evictions int64 // chunks removed to keep the quota
	Bytes     int64 // bytes held, including space reserved by Puts in progress
	Chunks    int64 // chunks held
	Quota     int64 // maxBytes given to Open; 0 means no limit
}

type entry struct {
	digest  string
	size    int64
	lru     *list.Element // in Cache.lru; nil once detached
	refs    int           // pins, including reads in progress
	f       *os.File      // open descriptor, shared by readers; nil when not open
	fdElem  *list.Element // in Cache.fds while f is set and the entry is attached
	touched time.Time     // last mtime written (or read at Open)
	// detached: the entry left the index (evicted, removed, broken) while
	// pinned; its file is already unlinked and f is closed by the last unpin.
	detached bool
}

// Cache is a directory of chunks. It is safe for concurrent use.
type Cache struct {
	dir      string
	maxBytes int64
	lowWater int64
	log      *slog.Logger

	// write writes a chunk to its temporary file; tests replace it to
	// simulate a full disk.
	write func(f *os.File, data []byte) (int, error)

	// mu guards the index only. It is held across unlink, rename and close
	// (so the directory and the index never disagree about a path) but never
	// across the read or write of chunk bytes.
	mu      sync.Mutex
	entries map[string]*entry
	lru     *list.List // of *entry, front = most recently used
	fds     *list.List // of *entry with an open f, front = most recently used
	size    int64      // bytes of entries plus reservations of Puts in progress
	closed  bool

	hits, misses, evictions atomic.Int64
}

// Open opens (creating) a cache in dir holding at most maxBytes (0: no
// limit). It rebuilds the index from the files present, ordered by mtime,
// removes leftovers of interrupted writes and files that are not chunks,
// and evicts down to the quota if the directory holds more.
func Open(dir string, maxBytes int64) (*Cache, error) {
	if maxBytes < 0 {
		maxBytes = 0
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("chunk cache %s: %w", dir, err)
	}
	c := &Cache{
		dir:      dir,
		maxBytes: maxBytes,
		lowWater: maxBytes - maxBytes*(100-lowWaterPercent)/100,
		log:      slog.Default().With("component", "chunkcache", "dir", dir),
		write:    func(f *os.File, data []byte) (int, error) { return f.Write(data) },
		entries:  map[string]*entry{},
		lru:      list.New(),
		fds:      list.New(),
	}
	found, err := c.scan()
	if err != nil {
		return nil, fmt.Errorf("chunk cache %s: %w", dir, err)
	}
	marker := filepath.Join(dir, openMarker)
	if _, err := os.Stat(marker); err == nil {
		found = c.checkRecent(found)
	}
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		return nil, fmt.Errorf("chunk cache %s: %w", dir, err)
	}
	// Oldest first, each pushed to the front: the newest ends up most recent.
	sort.Slice(found, func(i, j int) bool { return found[i].touched.Before(found[j].touched) })
	for _, e := range found {
		e.lru = c.lru.PushFront(e)
		c.entries[e.digest] = e
		c.addBytesLocked(e.size)
	}
	if c.maxBytes > 0 && c.size > c.maxBytes {
		c.mu.Lock()
		c.evictLocked(c.lowWater)
		c.mu.Unlock()
	}
	return c, nil
}

// scan lists the chunk files of the directory and removes what cannot be a
// complete chunk. Entries and directories it does not recognise at the top
// level are left alone: the directory may be misconfigured, and deleting
// someone else's files is worse than not counting them.
func (c *Cache) scan() ([]*entry, error) {
	top, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, err
	}
	var found []*entry
	for _, t := range top {
		if !t.IsDir() {
			if strings.HasPrefix(t.Name(), ".tmp-") {
				c.removeStray(filepath.Join(c.dir, t.Name()))
			}
			continue
		}
		if len(t.Name()) != 2 || !isHex(t.Name()) {
			continue
		}
		sub := filepath.Join(c.dir, t.Name())
		files, err := os.ReadDir(sub)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			p := filepath.Join(sub, f.Name())
			name := f.Name()
			if !f.Type().IsRegular() || len(name) != 64 || !isHex(name) || name[:2] != t.Name() {
				// A write that did not finish before a crash (.tmp-*), or
				// something that is not a chunk and would be served as one.
				c.removeStray(p)
				continue
			}
			info, err := f.Info()
			if err != nil {
				if errors.Is(err, os.ErrNotExist) {
					continue
				}
				return nil, err
			}
			found = append(found, &entry{digest: "sha256:" + name, size: info.Size(), touched: info.ModTime()})
		}
	}
	return found, nil
}

// checkRecent hashes the chunks written shortly before a crash and drops
// those whose bytes do not match their name: without fsync, a file renamed
// just before a power loss can come back short or zero-filled.
func (c *Cache) checkRecent(found []*entry) []*entry {
	var newest time.Time
	for _, e := range found {
		if e.touched.After(newest) {
			newest = e.touched
		}
	}
	kept := found[:0]
	for _, e := range found {
		if e.touched.Before(newest.Add(-crashWindow)) {
			kept = append(kept, e)
			continue
		}
		p, _ := c.path(e.digest)
		if err := checkFile(p, e.digest); err != nil {
			c.log.Warn("dropping chunk torn by a crash", "digest", e.digest, "err", err)
			c.removeStray(p)
			continue
		}
		kept = append(kept, e)
	}
	return kept
}

func checkFile(p, digest string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return fmt.Errorf("content is %s", got)
	}
	return nil
}

func (c *Cache) removeStray(p string) {
	if err := os.RemoveAll(p); err != nil {
		c.log.Warn("cannot remove stray file", "path", p, "err", err)
	}
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if !('0' <= s[i] && s[i] <= '9' || 'a' <= s[i] && s[i] <= 'f') {
			return false
		}
	}
	return true
}

func (c *Cache) path(digest string) (string, error) {
	name, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || len(name) != 64 || !isHex(name) {
		return "", fmt.Errorf("chunk cache: bad digest %q", digest)
	}
	return filepath.Join(c.dir, name[:2], name), nil
}

// Has reports whether digest is stored. It does not count as a use: the
// fetch path asks it of every chunk it might fetch, including prefetch.
func (c *Cache) Has(digest string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.entries[digest]
	return ok && !c.closed
}

// Size is the bytes held, including space reserved by Puts in progress. It
// never exceeds the quota.
func (c *Cache) Size() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size
}

// Stats returns the counters and the current occupancy.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	s := Stats{Bytes: c.size, Chunks: int64(len(c.entries)), Quota: c.maxBytes}
	c.mu.Unlock()
	s.Hits, s.Misses, s.Evictions = c.hits.Load(), c.misses.Load(), c.evictions.Load()
	return s
}

// Pin keeps digest from being evicted until release is called, so that a
// caller that has found a chunk can read it (possibly with several ReadAt
// calls) without it disappearing in between. It makes the chunk most
// recently used. Remove still removes a pinned chunk. release may be called
// more than once.
func (c *Cache) Pin(digest string) (release func(), ok bool) {
	c.mu.Lock()
	e := c.entries[digest]
	if e == nil || c.closed {
		c.mu.Unlock()
		return func() {}, false
	}
	e.refs++
	c.lru.MoveToFront(e.lru)
	c.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { c.unpin(e) }) }, true
}

func (c *Cache) unpin(e *entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.refs--
	if e.refs == 0 && e.f != nil && (e.detached || c.closed) {
		c.closeFileLocked(e)
	}
}

// ReadAt reads part of a stored chunk; ok is false when the chunk is not
// stored, and the caller then fetches it again. A hit makes the chunk most
// recently used. Reading at or past the chunk's end is a hit with n == 0.
// A file that turns out missing or short is dropped from the index and
// reported as a miss, never served.
func (c *Cache) ReadAt(digest string, p []byte, off int64) (n int, ok bool) {
	if off < 0 {
		return 0, false
	}
	e, f, own := c.acquire(digest)
	if e == nil {
		c.miss()
		return 0, false
	}
	n, err := f.ReadAt(p, off)
	short := errors.Is(err, io.EOF) && n < len(p) && off+int64(n) < e.size
	if own {
		f.Close()
	}
	if (err != nil && !errors.Is(err, io.EOF)) || short {
		c.log.Warn("dropping unreadable chunk", "digest", digest, "err", err, "short", short)
		c.drop(e)
		c.unpin(e)
		c.miss()
		return 0, false
	}
	c.unpin(e)
	c.hit()
	return n, true
}

// Get returns the whole chunk stored under digest, or ok=false. A hit makes
// the chunk most recently used.
func (c *Cache) Get(digest string) (data []byte, ok bool) {
	c.mu.Lock()
	e := c.entries[digest]
	var size int64
	if e != nil {
		size = e.size
	}
	c.mu.Unlock()
	if e == nil {
		c.miss()
		return nil, false
	}
	b := make([]byte, size)
	n, ok := c.ReadAt(digest, b, 0)
	if !ok || n != len(b) {
		// ReadAt counted the hit or miss.
		return nil, false
	}
	return b, true
}

// acquire pins digest's entry and returns a descriptor to read it through.
// When own is true the caller closes f; otherwise f belongs to the entry
// and stays open at least until the pin is released.
func (c *Cache) acquire(digest string) (e *entry, f *os.File, own bool) {
	now := time.Now()
	c.mu.Lock()
	e = c.entries[digest]
	if e == nil || c.closed {
		c.mu.Unlock()
		return nil, nil, false
	}
	e.refs++
	c.lru.MoveToFront(e.lru)
	f = e.f
	if f != nil {
		c.fds.MoveToFront(e.fdElem)
	}
	touch := now.Sub(e.touched) > touchEvery
	if touch {
		e.touched = now
	}
	c.mu.Unlock()

	path, _ := c.path(digest)
	if touch {
		// Only orders the index after a restart; a failure costs nothing now.
		_ = os.Chtimes(path, now, now)
	}
	if f != nil {
		return e, f, false
	}
	nf, err := os.Open(path)
	if err != nil {
		// Removed since the lookup, or removed behind our back.
		if errors.Is(err, os.ErrNotExist) {
			c.drop(e)
		}
		c.unpin(e)
		return nil, nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case e.f != nil:
		// Another reader opened it first.
		nf.Close()
		return e, e.f, false
	case e.detached || c.closed:
		return e, nf, true
	}
	e.f = nf
	e.fdElem = c.fds.PushFront(e)
	c.trimFilesLocked()
	return e, nf, false
}

// trimFilesLocked closes the descriptors of the least recently read chunks
// beyond maxOpenFiles. Descriptors of pinned chunks may be in use and stay.
func (c *Cache) trimFilesLocked() {
	for el := c.fds.Back(); el != nil && c.fds.Len() > maxOpenFiles; {
		prev := el.Prev()
		if e := el.Value.(*entry); e.refs == 0 {
			c.closeFileLocked(e)
		}
		el = prev
	}
}

func (c *Cache) closeFileLocked(e *entry) {
	if e.fdElem != nil {
		c.fds.Remove(e.fdElem)
		e.fdElem = nil
	}
	if e.f != nil {
		e.f.Close()
		e.f = nil
	}
}

// drop takes a chunk whose file is missing or unreadable out of the index,
// so that the next reader fetches it again.
func (c *Cache) drop(e *entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries[e.digest] == e {
		c.removeLocked(e)
	}
}

// Remove deletes digest from the cache. Readers that already hold the file
// open finish their read; later reads miss.
func (c *Cache) Remove(digest string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[digest]
	if e == nil {
		return nil
	}
	return c.removeLocked(e)
}

// removeLocked takes e out of the index and unlinks its file. Unlinking
// under the lock means a Put of the same digest can only rename its file
// into place after the old one is gone, never before.
func (c *Cache) removeLocked(e *entry) error {
	delete(c.entries, e.digest)
	c.lru.Remove(e.lru)
	e.lru = nil
	c.addBytesLocked(-e.size)
	if e.fdElem != nil {
		c.fds.Remove(e.fdElem)
		e.fdElem = nil
	}
	if e.refs == 0 {
		c.closeFileLocked(e)
	} else {
		e.detached = true
	}
	p, _ := c.path(e.digest)
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		c.log.Warn("cannot remove chunk", "digest", e.digest, "err", err)
		return fmt.Errorf("chunk cache: remove %s: %w", e.digest, err)
	}
	return nil
}

// evictLocked removes least recently used, unpinned chunks until at most
// target bytes are held (or nothing unpinned is left).
func (c *Cache) evictLocked(target int64) {
	for el := c.lru.Back(); el != nil && c.size > target; {
		prev := el.Prev()
		if e := el.Value.(*entry); e.refs == 0 {
			_ = c.removeLocked(e) // logged; the bytes are no longer ours to count
			c.evictions.Add(1)
			metricEvictions.Inc()
		}
		el = prev
	}
}

// reserveLocked makes room for n more bytes and counts them as held.
func (c *Cache) reserveLocked(n int64) error {
	if c.maxBytes > 0 {
		if n > c.maxBytes {
			return ErrTooLarge
		}
		if c.size+n > c.maxBytes {
			target := c.lowWater - n
			if target < 0 {
				target = c.maxBytes - n
			}
			c.evictLocked(target)
			if c.size+n > c.maxBytes {
				return ErrFull
			}
		}
	}
	c.addBytesLocked(n)
	return nil
}

func (c *Cache) unreserveLocked(n int64) { c.addBytesLocked(-n) }

// addBytesLocked keeps the gauge, summed over open caches, in step with size.
func (c *Cache) addBytesLocked(n int64) {
	c.size += n
	if !c.closed {
		metricBytes.Add(float64(n))
	}
}

// Put stores a chunk that the caller has verified against digest; the
// cache checks nothing. A chunk already stored is only made most recently
// used. Room is made (least recently used first) before anything is
// written, and the file appears under its name only once complete, so a
// partial chunk never looks whole. On error nothing is left behind.
func (c *Cache) Put(digest string, data []byte) error {
	return c.put(digest, int64(len(data)), func(f *os.File) error {
		_, err := c.write(f, data)
		return err
	})
}

// PutFile stores size bytes that fill writes under digest, for content
// assembled from chunks (a whole file, for FUSE passthrough) that no caller
// holds in memory. Unlike Put it checks the bytes against digest (and their
// length against size) before they become visible; otherwise it behaves as
// Put.
func (c *Cache) PutFile(digest string, size int64, fill func(io.Writer) error) error {
	return c.put(digest, size, func(f *os.File) error {
		h := sha256.New()
		w := &countWriter{w: io.MultiWriter(f, h)}
		if err := fill(w); err != nil {
			return err
		}
		if w.n != size {
			return fmt.Errorf("%d bytes written, %d announced", w.n, size)
		}
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
			return fmt.Errorf("content is %s", got)
		}
		return nil
	})
}

type countWriter struct {
	w io.Writer
	n int64
}

func (w *countWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.n += int64(n)
	return n, err
}

// put reserves n bytes, has fill write them to a temporary file, and
// renames that into place unless the same digest arrived meanwhile.
func (c *Cache) put(digest string, n int64, fill func(*os.File) error) error {
	p, err := c.path(digest)
	if err != nil {
		return err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return fmt.Errorf("chunk cache: put %s: %w", digest, ErrClosed)
	}
	if e := c.entries[digest]; e != nil {
		c.lru.MoveToFront(e.lru)
		c.mu.Unlock()
		return nil
	}
	err = c.reserveLocked(n)
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("chunk cache: put %s (%d bytes): %w", digest, n, err)
	}

	tmp, err := writeTemp(filepath.Dir(p), fill)
	if err != nil {
		c.mu.Lock()
		c.unreserveLocked(n)
		c.mu.Unlock()
		return fmt.Errorf("chunk cache: put %s: %w", digest, err)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[digest]; e != nil || c.closed {
		// A concurrent Put of the same chunk won; keep one copy.
		c.unreserveLocked(n)
		os.Remove(tmp)
		if e != nil {
			c.lru.MoveToFront(e.lru)
			return nil
		}
		return fmt.Errorf("chunk cache: put %s: %w", digest, ErrClosed)
	}
	if err := os.Rename(tmp, p); err != nil {
		c.unreserveLocked(n)
		os.Remove(tmp)
		return fmt.Errorf("chunk cache: put %s: %w", digest, err)
	}
	e := &entry{digest: digest, size: n, touched: time.Now()}
	e.lru = c.lru.PushFront(e)
	c.entries[digest] = e
	return nil
}

// writeTemp has fill write a new temporary file in dir and returns its
// name. No fsync: it would cost a disk flush per chunk on the read path,
// and what a crash can tear, Open checks (checkRecent).
func writeTemp(dir string, fill func(*os.File) error) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return "", err
	}
	if err := fill(f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return "", err
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// OpenFile opens the stored chunk (or file stored with PutFile) for a
// caller that keeps it, such as the kernel's FUSE passthrough; the caller
// closes it. A hit makes the chunk most recently used. The chunk can still
// be evicted: its bytes then stay readable through f but occupy the disk,
// outside the quota, until f is closed.
func (c *Cache) OpenFile(digest string) (f *os.File, ok bool) {
	release, ok := c.Pin(digest)
	if !ok {
		c.miss()
		return nil, false
	}
	defer release()
	p, _ := c.path(digest)
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			// Deleted behind our back: forget it, so that it is fetched again.
			c.mu.Lock()
			if e := c.entries[digest]; e != nil {
				c.removeLocked(e)
			}
			c.mu.Unlock()
		}
		c.miss()
		return nil, false
	}
	c.hit()
	return f, true
}

// Close releases the open descriptors. The chunks stay on disk for the next
// Open; after Close every lookup misses and Put fails.
func (c *Cache) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if err := os.Remove(filepath.Join(c.dir, openMarker)); err != nil && !errors.Is(err, os.ErrNotExist) {
		c.log.Warn("cannot remove open marker", "err", err)
	}
	for el := c.fds.Front(); el != nil; {
		next := el.Next()
		if e := el.Value.(*entry); e.refs == 0 {
			c.closeFileLocked(e)
		}
		el = next
	}
	metricBytes.Sub(float64(c.size))
	return nil
}

func (c *Cache) hit() {
	c.hits.Add(1)
	metricHits.Inc()
}

func (c *Cache) miss() {
	c.misses.Add(1)
	metricMisses.Inc()
}
