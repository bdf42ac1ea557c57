package storage

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/starling-dev/starling/pkg/byterange"
	"github.com/starling-dev/starling/pkg/piece"
)

// rangePersistEvery bounds how often marking ranges rewrites the task's
// metadata: a lazy reader marks a range per chunk, and a crash that loses
// the last second of marks costs only the sharing of those bytes (they
// are fetched again), never a wrong read.
const rangePersistEvery = time.Second

// WriteRange stores bytes of the task outside whole pieces. They are not
// served or reported as held until MarkRange: the caller verifies them
// first (a lazy reader checks its chunks against the layer's TOC).
func (t *Task) WriteRange(data []byte, off int64) error {
	if off < 0 || off+int64(len(data)) > t.m.Length {
		return fmt.Errorf("task %s: range %d+%d outside its %d bytes", t.id, off, len(data), t.m.Length)
	}
	if _, err := t.f.WriteAt(data, off); err != nil {
		return fmt.Errorf("task %s: write range %d+%d: %w", t.id, off, len(data), err)
	}
	return nil
}

// MarkRange records that [off, off+n) is held and verified. It does not
// write the metadata: FlushRanges does, so that a reader marking chunk
// after chunk does not wait for a commit each time.
func (t *Task) MarkRange(off, n int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if off < 0 || n <= 0 || off+n > t.m.Length {
		return fmt.Errorf("task %s: range %d+%d outside its %d bytes", t.id, off, n, t.m.Length)
	}
	t.m.Ranges.Add(off, off+n)
	t.m.LastUse = time.Now()
	t.rangesDirty = true
	return nil
}

// FlushRanges writes the marks MarkRange made; unless now is set, at most
// once per rangePersistEvery.
func (t *Task) FlushRanges(now bool) error {
	t.mu.Lock()
	if !t.rangesDirty || (!now && time.Since(t.rangesSaved) < rangePersistEvery) {
		t.mu.Unlock()
		return nil
	}
	t.rangesDirty = false
	t.rangesSaved = time.Now()
	t.mu.Unlock()
	t.s.mu.Lock()
	live := t.s.tasks[t.id] == t
	t.s.mu.Unlock()
	if !live {
		// Removed meanwhile: writing would bring its metadata back.
		return nil
	}
	return t.persist()
}

// Covered reports whether [off, off+n) is held, in whole pieces or ranges.
func (t *Task) Covered(off, n int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m.Done {
		return off >= 0 && off+n <= t.m.Length
	}
	end := off + n
	pos := off
	for pos < end {
		e := t.m.Ranges.CoverEnd(pos)
		if e == pos && t.m.PieceSize > 0 {
			k := int(pos / t.m.PieceSize)
			if _, ok := t.m.Pieces[k]; ok {
				s, l := piece.Range(k, t.m.Length, t.m.PieceSize)
				e = s + l
			}
		}
		if e == pos {
			return false
		}
		pos = e
	}
	return true
}

// Ranges returns the ranges held outside whole pieces.
func (t *Task) Ranges() byterange.Set {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append(byterange.Set(nil), t.m.Ranges...)
}

// OpenAt opens the task's file positioned at off, on a descriptor of its
// own so that an upload can go out with sendfile.
func (t *Task) OpenAt(off int64) (*os.File, error) {
	f, err := os.Open(t.s.path(t.id))
	if err != nil {
		return nil, fmt.Errorf("task %s: %w", t.id, err)
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("task %s: %w", t.id, err)
	}
	t.mu.Lock()
	t.m.LastUse = time.Now()
	t.mu.Unlock()
	return f, nil
}
