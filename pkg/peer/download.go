package peer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/piece"
)

// Download is one use of a task being fetched (or already held). It is an
// io.ReaderAt and a blob.Fetcher; several Downloads of one task share its
// pieces and its download loop.
type Download struct {
	t    *task
	once sync.Once
}

// Open starts (or joins) the download of a task. Nothing is fetched until
// ReadAt, NewReader, Ensure or Start asks for it; the origin is only asked
// for the task's size when neither the request nor the storage knows it.
func (p *Peer) Open(ctx context.Context, r Request) (*Download, error) {
	if r.TaskID == "" {
		return nil, errors.New("open task: no task ID")
	}
	if d := p.join(r.TaskID); d != nil {
		if hs, ok := d.t.src.(*httpSource); ok && r.Header.Get("Authorization") != "" {
			hs.setHeader(r.Header)
		}
		if !r.Lazy && d.t.req.Lazy && r.URL != "" {
			// A task first opened for range reads is now wanted whole:
			// a restart finishes it.
			saveRequest(p.o.Root, r)
		}
		return d, nil
	}
	src := r.Source
	if src == nil {
		if r.URL == "" {
			return nil, fmt.Errorf("open task %s: no URL and no source", r.TaskID)
		}
		src = HTTPSource(p.o.Client, r.URL, r.Header, WithAuthorizer(p.o.Authorizer))
	}
	st, ok := p.store.Lookup(r.TaskID)
	if ok {
		if err := piece.Check(st.Length(), st.PieceSize()); err != nil {
			// Cut by an earlier version or a scheduler that knew no
			// limits: its piece count may be anything. Start afresh.
			p.log.Warn("stored task cut out of limits, removed", "task", r.TaskID, "err", err)
			if err := p.store.Remove(r.TaskID); err != nil {
				return nil, fmt.Errorf("open task %s: remove a task stored with %w", r.TaskID, err)
			}
			ok = false
		}
	}
	registered := false
	if !ok {
		length := r.Length
		if length <= 0 {
			var err error
			if length, err = src.Size(ctx); err != nil {
				return nil, fmt.Errorf("open task %s: %w", r.TaskID, err)
			}
		}
		psize := p.o.PieceSize
		switch {
		case psize > 0:
		case r.Lazy:
			psize = piece.LazySize
		default:
			psize = piece.SizeFor(length)
		}
		// A configured size is brought within limits (the scheduler
		// refuses others), and a larger one taken where the task would
		// have too many pieces.
		psize, ok = piece.Fit(length, psize)
		if !ok {
			return nil, fmt.Errorf("open task %s (%s): %d bytes, more than the %d a task may have", r.TaskID, r.URL, length, piece.MaxLength)
		}
		// Every peer must cut a task the same way: the first registration
		// at the scheduler fixes length and piece size.
		if l, ps, ok := p.register(ctx, r, length, psize); ok {
			registered = true
			if l > 0 && l != length {
				return nil, fmt.Errorf("open task %s (%s): the origin says %d bytes, other peers %d", r.TaskID, r.URL, length, l)
			}
			switch err := piece.Check(length, ps); {
			case ps == 0 || ps == psize:
			case err != nil:
				// The answer is a number someone else chose: pieces of 1
				// byte once made a peer allocate 2 GB. Our own cut works;
				// the scheduler ignores its reports if the others differ.
				p.log.Warn("scheduler answered a piece size out of limits, using ours", "task", r.TaskID,
					"piece_size", psize, "err", err)
			default:
				psize = ps
			}
		}
		var err error
		if st, err = p.store.Task(r.TaskID, length, psize, r.Digest); err != nil {
			return nil, fmt.Errorf("open task %s: %w", r.TaskID, err)
		}
	}
	t := newTask(p, r, src, st)
	t.registered = registered
	p.mu.Lock()
	defer p.mu.Unlock()
	if old := p.tasks[r.TaskID]; old != nil {
		old.mu.Lock()
		old.refs++
		old.mu.Unlock()
		return &Download{t: old}, nil
	}
	st.Acquire()
	t.refs = 1
	p.tasks[r.TaskID] = t
	if !t.done && r.URL != "" {
		saveRequest(p.o.Root, r)
	}
	return &Download{t: t}, nil
}

func (p *Peer) join(id string) *Download {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.tasks[id]
	if t == nil {
		return nil
	}
	t.mu.Lock()
	t.refs++
	t.mu.Unlock()
	return &Download{t: t}
}

// register tells the task's scheduler about it; ok is false when there is
// no scheduler or it does not answer (the peer then works from the origin).
func (p *Peer) register(ctx context.Context, r Request, length, psize int64) (int64, int64, bool) {
	if p.sched == nil {
		return 0, 0, false
	}
	p.sched.mu.Lock()
	up := p.sched.up
	p.sched.mu.Unlock()
	if !up {
		return 0, 0, false
	}
	addr, cl := p.sched.Pick(r.TaskID)
	if cl == nil {
		return 0, 0, false
	}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := cl.RegisterTask(ctx, &schedulerpb.RegisterTaskRequest{PeerId: p.id, Task: workOf(r), Length: length, PieceSize: psize})
	if err != nil {
		p.sched.setUp(false, fmt.Errorf("register task %s with scheduler %s: %w", r.TaskID, addr, err))
		return 0, 0, false
	}
	return resp.GetLength(), resp.GetPieceSize(), true
}

// release drops a task that nobody uses and that is not downloading.
func (p *Peer) release(t *task) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t.mu.Lock()
	idle := t.refs == 0 && !t.running
	t.mu.Unlock()
	if idle && p.tasks[t.id] == t {
		delete(p.tasks, t.id)
		t.st.Release()
	}
}

// Length is the task's size in bytes.
func (d *Download) Length() int64 { return d.t.length }

// TaskID names the task.
func (d *Download) TaskID() string { return d.t.id }

// Ensure fetches the pieces covering [off, off+length) and waits for them.
func (d *Download) Ensure(ctx context.Context, off, length int64) error {
	t := d.t
	if length == 0 {
		return nil
	}
	first, last, ok := piece.Covering(off, length, t.length, t.psize)
	if !ok {
		return fmt.Errorf("task %s: range %d+%d outside its %d bytes", t.id, off, length, t.length)
	}
	t.mu.Lock()
	t.wantLocked(first, last)
	t.mu.Unlock()
	return t.waitRange(ctx, first, last)
}

// ReadAt fetches the pieces covering [off, off+len(b)) first and waits for them.
func (d *Download) ReadAt(b []byte, off int64) (int, error) {
	if off >= d.t.length {
		return 0, io.EOF
	}
	n := min(int64(len(b)), d.t.length-off)
	if err := d.Ensure(d.t.p.ctx, off, n); err != nil {
		return 0, err
	}
	k, err := d.t.st.ReadAt(b[:n], off)
	if err == nil && int64(k) < int64(len(b)) {
		err = io.EOF
	}
	return k, err
}

// Fetch is blob.Fetcher: the bytes once the pieces covering them are there.
func (d *Download) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	if err := d.Ensure(ctx, off, length); err != nil {
		return nil, err
	}
	return io.NopCloser(io.NewSectionReader(d.t.st, off, length)), nil
}

// NewReader streams [off, off+length) in order, each piece as soon as it
// is there and verified; length < 0 means to the end.
func (d *Download) NewReader(ctx context.Context, off, length int64) io.ReadCloser {
	t := d.t
	if length < 0 || off+length > t.length {
		length = t.length - off
	}
	r := &reader{ctx: ctx, t: t, pos: off, end: off + max(length, 0)}
	if length > 0 {
		if first, last, ok := piece.Covering(off, length, t.length, t.psize); ok {
			// The reader's next pieces first, then the window ahead of
			// it (pendingLocked); Read moves the front along.
			t.mu.Lock()
			for n := first; n <= last; n++ {
				if !t.have[n] {
					t.wanted[n] = true
					delete(t.failed, n)
				}
			}
			t.fronts[r] = first
			t.wantLocked(first, min(first+readAhead-1, last))
			t.mu.Unlock()
		}
	}
	return r
}

// readAhead is how many pieces ahead of a streaming reader are fetched first.
const readAhead = 2

type reader struct {
	ctx      context.Context
	t        *task
	pos, end int64
}

func (r *reader) Read(b []byte) (int, error) {
	if r.pos >= r.end {
		r.Close()
		return 0, io.EOF
	}
	n := int(r.pos / r.t.psize)
	last := int((r.end - 1) / r.t.psize)
	r.t.mu.Lock()
	if f, ok := r.t.fronts[r]; ok && f != n {
		r.t.fronts[r] = n
	}
	if !r.t.have[n] || (n+1 <= last && !r.t.have[n+1]) {
		r.t.wantLocked(n, min(n+readAhead-1, last))
	}
	r.t.mu.Unlock()
	if err := r.t.waitRange(r.ctx, n, n); err != nil {
		return 0, err
	}
	pieceEnd := min(int64(n+1)*r.t.psize, r.t.length)
	k := min(int64(len(b)), pieceEnd-r.pos, r.end-r.pos)
	got, err := r.t.st.ReadAt(b[:k], r.pos)
	r.pos += int64(got)
	if err != nil && !errors.Is(err, io.EOF) {
		// A task discarded after failing verification closes its file:
		// say why, not "file already closed".
		r.t.mu.Lock()
		fatal := r.t.fatal
		r.t.mu.Unlock()
		if fatal != nil {
			return got, fatal
		}
		return got, fmt.Errorf("read task %s at %d: %w", r.t.id, r.pos, err)
	}
	return got, nil
}

func (r *reader) Close() error {
	r.t.mu.Lock()
	delete(r.t.fronts, r)
	r.t.mu.Unlock()
	return nil
}

// Start fetches the whole task in the background.
func (d *Download) Start() {
	t := d.t
	t.mu.Lock()
	defer t.mu.Unlock()
	t.all = true
	for n := range t.failed {
		delete(t.failed, n)
	}
	t.startLocked()
}

// Wait blocks until the whole task is there and verified against its digest.
func (d *Download) Wait(ctx context.Context) error {
	t := d.t
	if t.count == 0 {
		return nil
	}
	if err := t.waitRange(ctx, 0, t.count-1); err != nil {
		return err
	}
	for {
		t.mu.Lock()
		if t.done || t.fatal != nil {
			err := t.fatal
			t.mu.Unlock()
			return err
		}
		if !t.running {
			// Every piece came in while no loop ran (another Download's
			// range reads): verify here.
			t.mu.Unlock()
			t.finish()
			continue
		}
		ch := t.changed
		t.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Progress reports the bytes held and the total.
func (d *Download) Progress() (done, total int64) {
	t := d.t
	t.mu.Lock()
	defer t.mu.Unlock()
	for n, h := range t.have {
		if h {
			_, l := piece.Range(n, t.length, t.psize)
			done += l
		}
	}
	return done, t.length
}

// Close releases the download; the task stays in storage.
func (d *Download) Close() error {
	d.once.Do(func() {
		t := d.t
		t.mu.Lock()
		t.refs--
		t.mu.Unlock()
		t.p.release(t)
	})
	return nil
}

// savedRequest is what a restarted peer needs to finish a download.
type savedRequest struct {
	TaskID string              `json:"task_id"`
	URL    string              `json:"url"`
	Header map[string][]string `json:"header,omitempty"`
	Digest string              `json:"digest,omitempty"`
	// Lazy tasks are kept for serving, not resumed: their reader is gone
	// and their credentials were not saved.
	Lazy bool `json:"lazy,omitempty"`
}

func requestPath(root, id string) string {
	return filepath.Join(root, "requests", strings.ReplaceAll(id, ":", "_")+".json")
}

func saveRequest(root string, r Request) {
	sr := savedRequest{TaskID: r.TaskID, URL: r.URL, Header: r.Header, Digest: r.Digest, Lazy: r.Lazy}
	if r.Lazy {
		// Nothing resumes a lazy task, so its (short-lived) credentials
		// need not sit on disk.
		sr.Header = nil
	}
	b, _ := json.Marshal(sr)
	p := requestPath(root, r.TaskID)
	_ = os.MkdirAll(filepath.Dir(p), 0o700)
	// Headers may carry credentials: readable by root only.
	_ = os.WriteFile(p, b, 0o600)
}

func removeRequest(root, id string) { _ = os.Remove(requestPath(root, id)) }

// resume finishes, in the background, the downloads a previous run of the
// peer left unfinished.
func (p *Peer) resume() {
	files, _ := filepath.Glob(filepath.Join(p.o.Root, "requests", "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		var sr savedRequest
		if err != nil || json.Unmarshal(b, &sr) != nil || sr.TaskID == "" {
			_ = os.Remove(f)
			continue
		}
		st, ok := p.store.Lookup(sr.TaskID)
		if !ok || st.Done() {
			_ = os.Remove(f)
			continue
		}
		if sr.Lazy {
			// Fetching the rest of a lazily read blob would cost the
			// origin link what lazy pulling saved (and the request has no
			// credentials). Its pieces stay, announced and served.
			p.log.Debug("lazy task not resumed", "task", sr.TaskID)
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			d, err := p.Open(p.ctx, Request{TaskID: sr.TaskID, URL: sr.URL, Header: sr.Header, Digest: sr.Digest})
			if err != nil {
				p.log.Warn("resume download", "task", sr.TaskID, "url", sr.URL, "err", err)
				return
			}
			defer d.Close()
			p.log.Info("resuming download", "task", sr.TaskID, "url", sr.URL)
			d.Start()
			if err := d.Wait(p.ctx); err != nil && p.ctx.Err() == nil {
				p.log.Warn("resume download", "task", sr.TaskID, "url", sr.URL, "err", err)
			}
		}()
	}
}
