// Package storage keeps the pieces of P2P tasks on disk: a file per task,
// and in bbolt which pieces it holds, their digests and when it was last
// used, so that a restarted peer still serves what it had. Garbage
// collection removes tasks by age and, past a disk quota's high watermark,
// least recently used first down to the low watermark; a task being read or
// written is never removed.
package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/starling-dev/starling/pkg/byterange"
	"github.com/starling-dev/starling/pkg/piece"
)

var bucketTasks = []byte("tasks")

var validID = regexp.MustCompile(`^[a-z0-9]+(:[a-f0-9]+)?$`)

// Options configures a Store.
type Options struct {
	// Quota is the disk space tasks may use, in bytes (0: no quota).
	Quota int64
	// HighWatermark and LowWatermark are fractions of Quota: collection
	// starts above the first and stops below the second.
	HighWatermark, LowWatermark float64
	// MaxAge removes tasks unused for longer (0: never).
	MaxAge time.Duration
}

// ErrPieceDigest is returned for a piece whose bytes do not match its digest.
var ErrPieceDigest = errors.New("piece does not match its digest")

// ErrTaskDigest is returned when a finished task does not match its digest.
var ErrTaskDigest = errors.New("task does not match its digest")

// meta is what bbolt holds of a task.
type meta struct {
	Length    int64          `json:"length"`
	PieceSize int64          `json:"piece_size"`
	Digest    string         `json:"digest,omitempty"`
	Pieces    map[int]string `json:"pieces"`
	Done      bool           `json:"done"`
	LastUse   time.Time      `json:"last_use"`
	// Ranges are bytes held outside whole pieces (lazy reads, ranges.go).
	Ranges byterange.Set `json:"ranges,omitempty"`
}

// held is how many bytes of the task are on disk: a lazily read task is
// sparse, and its length would overstate what it costs the quota.
func (m *meta) held() int64 {
	if m.Done {
		return m.Length
	}
	return min(m.Length, int64(len(m.Pieces))*m.PieceSize+m.Ranges.Bytes())
}

// Store holds tasks under a directory. It is safe for concurrent use.
type Store struct {
	dir string
	o   Options
	db  *bolt.DB

	mu    sync.Mutex
	tasks map[string]*Task
}

// Open opens (creating) the store in dir.
func Open(dir string, o Options) (*Store, error) {
	if o.HighWatermark <= 0 {
		o.HighWatermark = 0.9
	}
	if o.LowWatermark <= 0 || o.LowWatermark >= o.HighWatermark {
		o.LowWatermark = o.HighWatermark * 0.8
	}
	if err := os.MkdirAll(filepath.Join(dir, "tasks"), 0o700); err != nil {
		return nil, fmt.Errorf("storage %s: %w", dir, err)
	}
	db, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("storage %s: %w", dir, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketTasks)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("storage %s: %w", dir, err)
	}
	return &Store{dir: dir, o: o, db: db, tasks: map[string]*Task{}}, nil
}

// Close writes range marks not yet saved and closes the metadata database.
func (s *Store) Close() error {
	s.mu.Lock()
	tasks := make([]*Task, 0, len(s.tasks))
	for _, t := range s.tasks {
		tasks = append(tasks, t)
	}
	s.mu.Unlock()
	for _, t := range tasks {
		_ = t.FlushRanges(true)
	}
	return s.db.Close()
}

func (s *Store) path(id string) string {
	sum := sha256.Sum256([]byte(id))
	h := hex.EncodeToString(sum[:])
	return filepath.Join(s.dir, "tasks", h[:2], h)
}

// Task is one stored task.
type Task struct {
	s    *Store
	id   string
	mu   sync.Mutex
	m    meta
	f    *os.File
	refs int
	// rangesSaved and rangesDirty batch the persistence of MarkRange.
	rangesSaved time.Time
	rangesDirty bool
}

// Task opens the task id, creating it with length, piece size and expected
// digest ("" when unknown) if it is new. An existing task must agree.
func (s *Store) Task(id string, length, pieceSize int64, digest string) (*Task, error) {
	if !validID.MatchString(id) {
		return nil, fmt.Errorf("task %q: bad ID", id)
	}
	if pieceSize <= 0 {
		pieceSize = piece.DefaultSize
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.tasks[id]; ok {
		if t.m.Length != length || t.m.PieceSize != pieceSize {
			return nil, fmt.Errorf("task %s: stored with length %d and pieces of %d, asked for %d and %d", id, t.m.Length, t.m.PieceSize, length, pieceSize)
		}
		return t, nil
	}
	t := &Task{s: s, id: id}
	found, err := s.load(id, &t.m)
	if err != nil {
		return nil, err
	}
	if found && (t.m.Length != length || t.m.PieceSize != pieceSize) {
		return nil, fmt.Errorf("task %s: stored with length %d and pieces of %d, asked for %d and %d", id, t.m.Length, t.m.PieceSize, length, pieceSize)
	}
	if !found {
		t.m = meta{Length: length, PieceSize: pieceSize, Digest: digest, Pieces: map[int]string{}, LastUse: time.Now()}
	}
	return s.openLocked(t)
}

// openLocked opens the file of t and keeps t; s.mu is held.
func (s *Store) openLocked(t *Task) (*Task, error) {
	id := t.id
	p := s.path(id)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("task %s: %w", id, err)
	}
	if err := f.Truncate(t.m.Length); err != nil {
		f.Close()
		return nil, fmt.Errorf("task %s: %w", id, err)
	}
	t.f = f
	if err := s.save(id, &t.m); err != nil {
		f.Close()
		return nil, err
	}
	s.tasks[id] = t
	return t, nil
}

// Lookup returns a task the store holds, without creating it.
func (s *Store) Lookup(id string) (*Task, bool) {
	// Under the lock, like Task and Remove: a task removed meanwhile is
	// not brought back as an empty one.
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.tasks[id]; ok {
		return t, true
	}
	t := &Task{s: s, id: id}
	found, err := s.load(id, &t.m)
	if err != nil || !found {
		return nil, false
	}
	t, err = s.openLocked(t)
	return t, err == nil
}

// IDs lists the stored tasks.
func (s *Store) IDs() []string {
	var ids []string
	_ = s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTasks).ForEach(func(k, _ []byte) error {
			ids = append(ids, string(k))
			return nil
		})
	})
	return ids
}

// Held is what the store holds of one task, read from the metadata alone.
type Held struct {
	ID        string
	Length    int64
	PieceSize int64
	// Pieces maps piece numbers to their hex sha256.
	Pieces map[int]string
	// Ranges are bytes held outside whole pieces.
	Ranges byterange.Set
}

// Holdings lists every stored task with its pieces, without opening the
// task files (a peer announces them all after a scheduler restart).
func (s *Store) Holdings() []Held {
	var out []Held
	_ = s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTasks).ForEach(func(k, v []byte) error {
			var m meta
			if json.Unmarshal(v, &m) == nil {
				out = append(out, Held{ID: string(k), Length: m.Length, PieceSize: m.PieceSize, Pieces: m.Pieces, Ranges: m.Ranges})
			}
			return nil
		})
	})
	return out
}

func (s *Store) load(id string, m *meta) (bool, error) {
	var raw []byte
	if err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketTasks).Get([]byte(id)); v != nil {
			raw = append([]byte(nil), v...)
		}
		return nil
	}); err != nil {
		return false, err
	}
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, m); err != nil {
		return false, fmt.Errorf("task %s: metadata: %w", id, err)
	}
	if m.Pieces == nil {
		m.Pieces = map[int]string{}
	}
	return true, nil
}

func (s *Store) save(id string, m *meta) error {
	raw, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketTasks).Put([]byte(id), raw) })
}

// ID is the task's ID.
func (t *Task) ID() string { return t.id }

// Length is the task's size in bytes.
func (t *Task) Length() int64 { return t.m.Length }

// PieceSize is the size of its pieces.
func (t *Task) PieceSize() int64 { return t.m.PieceSize }

// Acquire protects the task from garbage collection until Release.
func (t *Task) Acquire() {
	t.mu.Lock()
	t.refs++
	t.mu.Unlock()
}

// Release undoes one Acquire; the last one writes ranges not yet saved.
func (t *Task) Release() {
	t.mu.Lock()
	t.refs--
	last := t.refs == 0
	t.mu.Unlock()
	if last {
		_ = t.FlushRanges(true)
	}
}

// Pieces returns the digests of the pieces held, by number.
func (t *Task) Pieces() map[int]string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[int]string, len(t.m.Pieces))
	for k, v := range t.m.Pieces {
		out[k] = v
	}
	return out
}

// HasPiece reports whether piece n is held.
func (t *Task) HasPiece(n int) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.m.Pieces[n]
	return ok
}

// Done reports whether every piece is held and the whole was verified.
func (t *Task) Done() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m.Done
}

// WritePiece stores piece n after checking it against sum (hex sha256).
func (t *Task) WritePiece(n int, data []byte, sum string) error {
	off, l := piece.Range(n, t.m.Length, t.m.PieceSize)
	if n < 0 || l <= 0 || int64(len(data)) != l {
		return fmt.Errorf("task %s piece %d: %d bytes, want %d", t.id, n, len(data), l)
	}
	got := sha256.Sum256(data)
	if hex.EncodeToString(got[:]) != sum {
		return fmt.Errorf("task %s piece %d: %w", t.id, n, ErrPieceDigest)
	}
	if _, err := t.f.WriteAt(data, off); err != nil {
		return fmt.Errorf("task %s piece %d: %w", t.id, n, err)
	}
	t.mu.Lock()
	t.m.Pieces[n] = sum
	t.m.LastUse = time.Now()
	t.mu.Unlock()
	return t.persist()
}

// persist writes the task's metadata. Not under t.mu: a commit waits for
// fsync, and readers of the task (uploads) must not wait for that. Each
// transaction marshals the newest state, so concurrent writers of one task
// cannot leave an older one behind, and Batch folds them into few commits.
func (t *Task) persist() error {
	return t.s.db.Batch(func(tx *bolt.Tx) error {
		t.mu.Lock()
		raw, err := json.Marshal(&t.m)
		t.mu.Unlock()
		if err != nil {
			return err
		}
		return tx.Bucket(bucketTasks).Put([]byte(t.id), raw)
	})
}

// OpenPiece opens the task's file positioned at piece n, on a descriptor
// of its own so that an upload can go out with sendfile (io.Copy of an
// io.LimitReader over it); ok is false if the piece is not held.
func (t *Task) OpenPiece(n int) (f *os.File, length int64, sum string, ok bool, err error) {
	t.mu.Lock()
	sum, ok = t.m.Pieces[n]
	t.m.LastUse = time.Now()
	t.mu.Unlock()
	if !ok {
		return nil, 0, "", false, nil
	}
	off, l := piece.Range(n, t.m.Length, t.m.PieceSize)
	f, err = os.Open(t.s.path(t.id))
	if err != nil {
		return nil, 0, "", false, fmt.Errorf("task %s piece %d: %w", t.id, n, err)
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		f.Close()
		return nil, 0, "", false, fmt.Errorf("task %s piece %d: %w", t.id, n, err)
	}
	return f, l, sum, true, nil
}

// ReadPiece returns piece n with its digest; ok is false if it is not held.
func (t *Task) ReadPiece(n int) (data []byte, sum string, ok bool, err error) {
	t.mu.Lock()
	sum, ok = t.m.Pieces[n]
	t.m.LastUse = time.Now()
	t.mu.Unlock()
	if !ok {
		return nil, "", false, nil
	}
	off, l := piece.Range(n, t.m.Length, t.m.PieceSize)
	data = make([]byte, l)
	if _, err := t.f.ReadAt(data, off); err != nil {
		return nil, "", false, fmt.Errorf("task %s piece %d: %w", t.id, n, err)
	}
	return data, sum, true, nil
}

// ReadAt reads stored bytes; the caller makes sure the pieces are held.
func (t *Task) ReadAt(p []byte, off int64) (int, error) { return t.f.ReadAt(p, off) }

// Finish checks that every piece is held and, when the task has a digest,
// that the whole matches it. A mismatch removes the task.
func (t *Task) Finish() error {
	t.mu.Lock()
	n := piece.Count(t.m.Length, t.m.PieceSize)
	if len(t.m.Pieces) != n {
		t.mu.Unlock()
		return fmt.Errorf("task %s: %d of %d pieces", t.id, len(t.m.Pieces), n)
	}
	digest := t.m.Digest
	t.mu.Unlock()
	if digest != "" {
		algo, want, _ := cutDigest(digest)
		if algo != "sha256" {
			return fmt.Errorf("task %s: cannot verify %s", t.id, digest)
		}
		h := sha256.New()
		buf := make([]byte, 1<<20)
		for off := int64(0); off < t.m.Length; off += int64(len(buf)) {
			k, err := t.f.ReadAt(buf[:min(int64(len(buf)), t.m.Length-off)], off)
			if err != nil {
				return fmt.Errorf("task %s: %w", t.id, err)
			}
			h.Write(buf[:k])
		}
		if hex.EncodeToString(h.Sum(nil)) != want {
			_ = t.s.Remove(t.id)
			return fmt.Errorf("task %s: %w", t.id, ErrTaskDigest)
		}
	}
	t.mu.Lock()
	t.m.Done = true
	t.mu.Unlock()
	return t.persist()
}

func cutDigest(d string) (algo, hexs string, ok bool) {
	for i := 0; i < len(d); i++ {
		if d[i] == ':' {
			return d[:i], d[i+1:], true
		}
	}
	return "", d, false
}

// Remove deletes a task and its data.
func (s *Store) Remove(id string) error {
	s.mu.Lock()
	t := s.tasks[id]
	delete(s.tasks, id)
	// The metadata goes first, under the lock: a Lookup that misses the
	// map then finds no metadata either, and cannot bring back an empty
	// task whose file is about to go.
	err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketTasks).Delete([]byte(id)) })
	s.mu.Unlock()
	if t != nil {
		t.f.Close()
	}
	if rerr := os.Remove(s.path(id)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return errors.Join(err, rerr)
	}
	return err
}

// GC removes tasks unused for longer than MaxAge, then, while the stored
// bytes exceed the high watermark of the quota, the least recently used
// tasks until below the low watermark. Tasks in use are kept.
func (s *Store) GC(now time.Time) []string {
	type ent struct {
		id   string
		size int64
		last time.Time
	}
	var ents []ent
	var total int64
	_ = s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTasks).ForEach(func(k, v []byte) error {
			var m meta
			if json.Unmarshal(v, &m) == nil {
				ents = append(ents, ent{string(k), m.held(), m.LastUse})
				total += m.held()
			}
			return nil
		})
	})
	inUse := func(id string) bool {
		s.mu.Lock()
		t := s.tasks[id]
		s.mu.Unlock()
		if t == nil {
			return false
		}
		t.mu.Lock()
		defer t.mu.Unlock()
		return t.refs > 0
	}
	var removed []string
	sort.Slice(ents, func(i, j int) bool { return ents[i].last.Before(ents[j].last) })
	keep := ents[:0]
	for _, e := range ents {
		if s.o.MaxAge > 0 && now.Sub(e.last) > s.o.MaxAge && !inUse(e.id) {
			if s.Remove(e.id) == nil {
				removed = append(removed, e.id)
				total -= e.size
				continue
			}
		}
		keep = append(keep, e)
	}
	if s.o.Quota > 0 && float64(total) > s.o.HighWatermark*float64(s.o.Quota) {
		low := s.o.LowWatermark * float64(s.o.Quota)
		for _, e := range keep {
			if float64(total) <= low {
				break
			}
			if inUse(e.id) {
				continue
			}
			if s.Remove(e.id) == nil {
				removed = append(removed, e.id)
				total -= e.size
			}
		}
	}
	return removed
}
