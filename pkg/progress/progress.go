// Package progress shows the progress of long operations (convert, pull,
// get, preheat): bars on a terminal, JSON lines for scripts, nothing when
// neither is wanted.
package progress

import (
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// Mode selects how progress is shown.
type Mode int

const (
	// Quiet shows nothing.
	Quiet Mode = iota
	// Bars draws mpb progress bars.
	Bars
	// JSON writes one JSON object per line: progress at most twice a second
	// per task, and one line when a task ends.
	JSON
)

// ModeFor picks Bars when w is a terminal and output is "text", JSON when
// output is "json", else Quiet.
func ModeFor(output string, w *os.File) Mode {
	if output == "json" {
		return JSON
	}
	if fi, err := w.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		return Bars
	}
	return Quiet
}

// Progress is a set of tasks shown together.
type Progress struct {
	mode Mode
	w    io.Writer
	bars *mpb.Progress
	mu   sync.Mutex // serialises JSON lines
}

// New returns a Progress writing to w in mode.
func New(w io.Writer, mode Mode) *Progress {
	p := &Progress{mode: mode, w: w}
	if mode == Bars {
		p.bars = mpb.New(mpb.WithOutput(w), mpb.WithWidth(40), mpb.WithRefreshRate(150*time.Millisecond))
	}
	return p
}

// Event is one JSON progress line.
type Event struct {
	Event   string `json:"event"` // "progress" or "done"
	ID      string `json:"id"`
	Name    string `json:"name"`
	Current int64  `json:"current"`
	Total   int64  `json:"total"`
	Error   string `json:"error,omitempty"`
}

// Task is one tracked operation, e.g. a layer.
type Task struct {
	p       *Progress
	id      string
	name    string
	mu      sync.Mutex
	current int64
	total   int64
	last    time.Time
	bar     *mpb.Bar
	done    bool
}

// Task starts tracking an operation of total bytes (0 if unknown yet).
func (p *Progress) Task(id, name string, total int64) *Task {
	t := &Task{p: p, id: id, name: name, total: total}
	if p.mode == Bars {
		t.bar = p.bars.AddBar(total,
			mpb.PrependDecorators(
				decor.Name(name, decor.WCSyncSpaceR),
				decor.OnComplete(decor.CountersKibiByte("% .1f / % .1f", decor.WCSyncSpace), "done"),
			),
			mpb.AppendDecorators(decor.OnComplete(decor.Percentage(decor.WCSyncSpace), "")),
		)
	}
	return t
}

// SetTotal sets the task's size once it is known.
func (t *Task) SetTotal(n int64) {
	t.mu.Lock()
	t.total = n
	t.mu.Unlock()
	if t.bar != nil {
		t.bar.SetTotal(n, false)
	}
}

// Add records n more bytes done.
func (t *Task) Add(n int64) {
	if n == 0 {
		return
	}
	t.mu.Lock()
	t.current += n
	emit := t.p.mode == JSON && time.Since(t.last) >= 500*time.Millisecond
	if emit {
		t.last = time.Now()
	}
	ev := Event{Event: "progress", ID: t.id, Name: t.name, Current: t.current, Total: t.total}
	t.mu.Unlock()
	if t.bar != nil {
		t.bar.IncrInt64(n)
	}
	if emit {
		t.p.emit(ev)
	}
}

// ProxyReader counts what is read through r.
func (t *Task) ProxyReader(r io.Reader) io.Reader { return &countReader{r: r, t: t} }

type countReader struct {
	r io.Reader
	t *Task
}

func (c *countReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.t.Add(int64(n))
	return n, err
}

// Done ends the task; err marks it failed.
func (t *Task) Done(err error) {
	t.mu.Lock()
	if t.done {
		t.mu.Unlock()
		return
	}
	t.done = true
	ev := Event{Event: "done", ID: t.id, Name: t.name, Current: t.current, Total: t.total}
	if err != nil {
		ev.Error = err.Error()
	}
	cur := t.current
	t.mu.Unlock()
	if t.bar != nil {
		if err != nil {
			t.bar.Abort(false)
		} else {
			t.bar.SetTotal(cur, true)
		}
	}
	if t.p.mode == JSON {
		t.p.emit(ev)
	}
}

func (p *Progress) emit(ev Event) {
	b, _ := json.Marshal(ev)
	p.mu.Lock()
	defer p.mu.Unlock()
	_, _ = p.w.Write(append(b, '\n'))
}

// Wait waits for the bars to draw their last state. Every task must be Done.
func (p *Progress) Wait() {
	if p.bars != nil {
		p.bars.Wait()
	}
}
