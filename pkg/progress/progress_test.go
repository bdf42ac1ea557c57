package progress

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestJSONEvents(t *testing.T) {
	var buf bytes.Buffer
	p := New(&buf, JSON)
	a := p.Task("a", "layer a", 10)
	if _, err := io.Copy(io.Discard, a.ProxyReader(strings.NewReader("0123456789"))); err != nil {
		t.Fatal(err)
	}
	a.Done(nil)
	b := p.Task("b", "layer b", 5)
	b.Done(errors.New("boom"))
	b.Done(nil) // a second Done is ignored
	p.Wait()
	var evs []Event
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var ev Event
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		evs = append(evs, ev)
	}
	last := evs[len(evs)-1]
	if last.ID != "b" || last.Event != "done" || last.Error != "boom" {
		t.Fatalf("last event %+v", last)
	}
	var sawA bool
	for _, ev := range evs {
		if ev.ID == "a" && ev.Event == "done" {
			sawA = ev.Current == 10 && ev.Total == 10
		}
	}
	if !sawA {
		t.Fatalf("no complete done event for a in %v", evs)
	}
}

func TestBarsAndQuiet(t *testing.T) {
	for _, m := range []Mode{Bars, Quiet} {
		var buf bytes.Buffer
		p := New(&buf, m)
		tk := p.Task("x", "x", 0)
		tk.SetTotal(3)
		tk.Add(3)
		tk.Done(nil)
		p.Wait()
		if m == Quiet && buf.Len() != 0 {
			t.Fatalf("quiet mode wrote %q", buf.String())
		}
	}
}
