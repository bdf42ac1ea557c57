package layer

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/starling-dev/starling/pkg/blob"
)

// tailReaderAt reads a blob through a Fetcher, fetching its last `tail`
// bytes in one request the first time any of them is asked for: footer and
// TOC sit at the end, so resolving a layer usually costs one request.
type tailReaderAt struct {
	ctx     context.Context
	f       blob.Fetcher
	size    int64
	tail    int64
	timeout time.Duration

	once sync.Once
	buf  []byte
	err  error
}

func (t *tailReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= t.size {
		return 0, io.EOF
	}
	start := t.size - t.tail
	if off >= start {
		t.once.Do(func() { t.buf, t.err = t.fetch(start, t.tail) })
		if t.err != nil {
			return 0, t.err
		}
		n := copy(p, t.buf[off-start:])
		if n < len(p) {
			return n, io.EOF
		}
		return n, nil
	}
	want := min(int64(len(p)), t.size-off)
	b, err := t.fetch(off, want)
	if err != nil {
		return 0, err
	}
	n := copy(p, b)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (t *tailReaderAt) fetch(off, n int64) ([]byte, error) {
	ctx := t.ctx
	if t.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t.timeout)
		defer cancel()
	}
	rc, err := t.f.Fetch(ctx, off, n)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(rc, b); err != nil {
		return nil, fmt.Errorf("read bytes %d-%d: %w", off, off+n-1, err)
	}
	return b, nil
}
