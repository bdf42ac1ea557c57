// Package chunkcache keeps verified, decompressed chunks of lazily read
// layers on disk, keyed by chunk digest, so that a chunk shared by several
// layers is stored once and survives a daemon restart.
package chunkcache

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Cache is a directory of chunks. It is safe for concurrent use.
type Cache struct {
	dir      string
	maxBytes int64
	size     atomic.Int64
	evictMu  sync.Mutex
}

// Open opens (creating) a cache in dir holding at most maxBytes (0: no limit).
func Open(dir string, maxBytes int64) (*Cache, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("chunk cache %s: %w", dir, err)
	}
	c := &Cache{dir: dir, maxBytes: maxBytes}
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if strings.HasPrefix(d.Name(), ".tmp-") {
			// A write that did not finish before a crash.
			return os.Remove(p)
		}
		if info, err := d.Info(); err == nil {
			total += info.Size()
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("chunk cache %s: %w", dir, err)
	}
	c.size.Store(total)
	return c, nil
}

func (c *Cache) path(digest string) (string, error) {
	algo, hex, ok := strings.Cut(digest, ":")
	if !ok || algo != "sha256" || len(hex) != 64 || strings.ContainsAny(hex, "/.") {
		return "", fmt.Errorf("chunk cache: bad digest %q", digest)
	}
	return filepath.Join(c.dir, hex[:2], hex), nil
}

// Get returns the chunk stored under digest, or ok=false.
func (c *Cache) Get(digest string) (data []byte, ok bool) {
	p, err := c.path(digest)
	if err != nil {
		return nil, false
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, false
	}
	// Recency for eviction; failures only make eviction less exact.
	now := time.Now()
	_ = os.Chtimes(p, now, now)
	return b, true
}

// Put stores a chunk that the caller has verified against digest. The file
// appears under its name only once complete, so a partial chunk never looks
// whole.
func (c *Cache) Put(digest string, data []byte) error {
	p, err := c.path(digest)
	if err != nil {
		return err
	}
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("chunk cache: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return fmt.Errorf("chunk cache: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("chunk cache: write %s: %w", digest, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("chunk cache: write %s: %w", digest, err)
	}
	if err := os.Rename(f.Name(), p); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("chunk cache: %w", err)
	}
	if c.maxBytes > 0 && c.size.Add(int64(len(data))) > c.maxBytes {
		go c.evict()
	}
	return nil
}

// evict removes the least recently used chunks until the cache is at 90 %
// of its limit.
func (c *Cache) evict() {
	if !c.evictMu.TryLock() {
		return
	}
	defer c.evictMu.Unlock()
	type ent struct {
		p    string
		size int64
		at   time.Time
	}
	var ents []ent
	var total int64
	_ = filepath.WalkDir(c.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		if info, err := d.Info(); err == nil {
			ents = append(ents, ent{p, info.Size(), info.ModTime()})
			total += info.Size()
		}
		return nil
	})
	sort.Slice(ents, func(i, j int) bool { return ents[i].at.Before(ents[j].at) })
	target := c.maxBytes * 9 / 10
	for _, e := range ents {
		if total <= target {
			break
		}
		if err := os.Remove(e.p); err == nil || errors.Is(err, fs.ErrNotExist) {
			total -= e.size
		}
	}
	c.size.Store(total)
}

// Size is the bytes held.
func (c *Cache) Size() int64 { return c.size.Load() }

// ReadAt reads part of a stored chunk; ok is false when the chunk is not stored.
func (c *Cache) ReadAt(digest string, p []byte, off int64) (n int, ok bool) {
	path, err := c.path(digest)
	if err != nil {
		return 0, false
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	n, err = f.ReadAt(p, off)
	if err != nil && n < len(p) && !errors.Is(err, io.EOF) {
		return n, false
	}
	return n, true
}

// Has reports whether digest is stored.
func (c *Cache) Has(digest string) bool {
	p, err := c.path(digest)
	if err != nil {
		return false
	}
	_, err = os.Stat(p)
	return err == nil
}
