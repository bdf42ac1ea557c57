package originq

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitQueued waits until host has n waiters in all.
func waitQueued(t *testing.T, g *Gate, host string, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, q := g.InFlight(host)
		total := 0
		for _, k := range q {
			total += k
		}
		if total == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters, want %d", total, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func mustAcquire(t *testing.T, g *Gate, host string, p Priority) func() {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	rel, err := g.Acquire(ctx, host, p)
	if err != nil {
		t.Fatalf("%s: no slot at once: %v", p, err)
	}
	return rel
}

func mustBlock(t *testing.T, g *Gate, host string, p Priority) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if rel, err := g.Acquire(ctx, host, p); err == nil {
		rel()
		t.Fatalf("%s got a slot past its limit", p)
	} else if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("%s: %v", p, err)
	}
}

func TestLimits(t *testing.T) {
	for _, c := range []struct{ n, demand, prefetch, background, seed int }{
		{16, 16, 14, 8, 4}, {8, 8, 6, 4, 2}, {2, 2, 1, 1, 1}, {1, 1, 1, 1, 1},
	} {
		got := []int{Limit(c.n, Demand), Limit(c.n, Prefetch), Limit(c.n, Background), Limit(c.n, Seed)}
		want := []int{c.demand, c.prefetch, c.background, c.seed}
		for i := range got {
			if got[i] != want[i] {
				t.Errorf("n=%d: limits %v, want %v", c.n, got, want)
				break
			}
		}
	}
	if New(0) != nil {
		t.Error("New(0) is a gate")
	}
	var g *Gate
	rel, err := g.Acquire(context.Background(), "h", Seed)
	if err != nil {
		t.Fatal(err)
	}
	rel()
}

// Priority order: with every slot taken, the waiters go highest first and
// FIFO within a priority, whatever order they came in.
func TestPriorityOrder(t *testing.T) {
	g := New(1)
	hold := mustAcquire(t, g, "reg", Demand)
	var mu sync.Mutex
	var order []string
	var wg sync.WaitGroup
	arrive := []struct {
		p    Priority
		name string
	}{{Seed, "seed"}, {Background, "bg1"}, {Prefetch, "pf"}, {Demand, "d1"}, {Background, "bg2"}, {Demand, "d2"}}
	for i, a := range arrive {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rel, err := g.Acquire(context.Background(), "reg", a.p)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			order = append(order, a.name)
			mu.Unlock()
			rel()
		}()
		waitQueued(t, g, "reg", i+1)
	}
	hold()
	wg.Wait()
	if got := strings.Join(order, " "); got != "d1 d2 pf bg1 bg2 seed" {
		t.Fatalf("served %s", got)
	}
	if n, q := g.InFlight("reg"); n != 0 || len(q) != 0 || len(g.hosts) != 0 {
		t.Fatalf("after all: %d in flight, %v queued, %d hosts kept", n, q, len(g.hosts))
	}
}

// Caps: lower priorities stop at their limit; demand never waits for
// them, and hosts do not share slots.
func TestCaps(t *testing.T) {
	g := New(8)
	var rels []func()
	for i := 0; i < 2; i++ {
		rels = append(rels, mustAcquire(t, g, "reg", Seed))
	}
	mustBlock(t, g, "reg", Seed)
	for i := 0; i < 2; i++ {
		rels = append(rels, mustAcquire(t, g, "reg", Background))
	}
	mustBlock(t, g, "reg", Background)
	mustBlock(t, g, "reg", Seed)
	// Background and seed work queued: demand still starts at once.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if rel, err := g.Acquire(ctx, "reg", Background); err == nil {
				rel()
			}
		}()
	}
	waitQueued(t, g, "reg", 3)
	for i := 0; i < 2; i++ {
		rels = append(rels, mustAcquire(t, g, "reg", Prefetch))
	}
	mustBlock(t, g, "reg", Prefetch) // 6 in flight
	for i := 0; i < 2; i++ {
		rels = append(rels, mustAcquire(t, g, "reg", Demand))
	}
	mustBlock(t, g, "reg", Demand) // 8 in flight
	// Another host has its own slots.
	mustAcquire(t, g, "other", Seed)()
	cancel()
	wg.Wait()
	for _, r := range rels {
		r()
		r() // a second release gives back nothing
	}
	if n, q := g.InFlight("reg"); n != 0 || len(q) != 0 {
		t.Fatalf("%d in flight, %v queued", n, q)
	}
}

// A waiter whose ctx ends leaves the queue, holds nothing, and does not
// hold back those behind it.
func TestCancel(t *testing.T) {
	g := New(1)
	hold := mustAcquire(t, g, "reg", Demand)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := g.Acquire(ctx, "reg", Demand)
		errc <- err
	}()
	waitQueued(t, g, "reg", 1)
	got := make(chan struct{})
	go func() {
		rel, err := g.Acquire(context.Background(), "reg", Seed)
		if err == nil {
			rel()
		}
		close(got)
	}()
	waitQueued(t, g, "reg", 2)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	hold()
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter behind a cancelled one never got its slot")
	}
	if _, err := g.Acquire(ctx, "reg", Demand); err == nil {
		t.Fatal("an ended ctx got a slot")
	}
}

// Under concurrent acquire, release and cancellation, no slot leaks and
// the limit holds.
func TestStress(t *testing.T) {
	g := New(4)
	var wg sync.WaitGroup
	var mu sync.Mutex
	inflight, peak := 0, 0
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := priorities[rand.Intn(len(priorities))]
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rand.Intn(3000))*time.Microsecond)
			defer cancel()
			rel, err := g.Acquire(ctx, "reg", p)
			if err != nil {
				return
			}
			mu.Lock()
			inflight++
			peak = max(peak, inflight)
			mu.Unlock()
			time.Sleep(time.Duration(rand.Intn(200)) * time.Microsecond)
			mu.Lock()
			inflight--
			mu.Unlock()
			rel()
		}()
	}
	wg.Wait()
	if peak > 4 {
		t.Fatalf("%d in flight at once, limit 4", peak)
	}
	if n, q := g.InFlight("reg"); n != 0 || len(q) != 0 || len(g.hosts) != 0 {
		t.Fatalf("leaked: %d in flight, %v queued, %d hosts", n, q, len(g.hosts))
	}
}

// A Level raised while its request waits moves the request up: a chunk
// that background fetch claimed and a demand read now needs.
func TestLevelRaise(t *testing.T) {
	g := New(1)
	hold := mustAcquire(t, g, "reg", Demand)
	lvl := NewLevel(Background)
	var mu sync.Mutex
	var order []string
	var wg sync.WaitGroup
	run := func(ctx context.Context, p Priority, name string) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rel, err := g.Acquire(ctx, "reg", p)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			order = append(order, name)
			mu.Unlock()
			rel()
		}()
	}
	run(context.Background(), Prefetch, "prefetch")
	waitQueued(t, g, "reg", 1)
	run(WithLevel(context.Background(), lvl), PriorityFrom(WithLevel(context.Background(), lvl)), "raised")
	waitQueued(t, g, "reg", 2)
	if _, q := g.InFlight("reg"); q[Background] != 1 {
		t.Fatalf("queued %v", q)
	}
	lvl.Raise(Demand)
	lvl.Raise(Seed) // never lowers
	if _, q := g.InFlight("reg"); q[Demand] != 1 || q[Background] != 0 {
		t.Fatalf("after raise, queued %v", q)
	}
	hold()
	wg.Wait()
	if got := strings.Join(order, " "); got != "raised prefetch" {
		t.Fatalf("served %s", got)
	}
	if lvl.Priority() != Demand {
		t.Fatal(lvl.Priority())
	}
}

func TestPriorityContext(t *testing.T) {
	ctx := context.Background()
	if PriorityFrom(ctx) != Demand {
		t.Fatal("default is not demand")
	}
	if PriorityFrom(WithPriority(ctx, Seed)) != Seed || PriorityFrom(WithPriority(ctx, 0)) != Demand {
		t.Fatal("WithPriority")
	}
	if Seed.String() != "seed" || Priority(0).String() != "demand" {
		t.Fatal("names")
	}
}

type memFetcher struct {
	data []byte
	fail bool
	got  []Priority
	mu   sync.Mutex
}

func (m *memFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	m.mu.Lock()
	m.got = append(m.got, PriorityFrom(ctx))
	m.mu.Unlock()
	if m.fail {
		return nil, errors.New("boom")
	}
	return io.NopCloser(bytes.NewReader(m.data[off : off+length])), nil
}

// The fetcher wrapper holds its slot until the body is closed, and gives
// it back when the request fails.
func TestFetcher(t *testing.T) {
	g := New(1)
	m := &memFetcher{data: []byte("0123456789")}
	f := Fetcher(g, "reg", m)
	rc, err := f.Fetch(WithPriority(context.Background(), Background), 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := g.InFlight("reg"); n != 1 {
		t.Fatalf("%d in flight while a body is open", n)
	}
	b, _ := io.ReadAll(rc)
	if string(b) != "234" {
		t.Fatalf("%q", b)
	}
	rc.Close()
	rc.Close()
	if n, _ := g.InFlight("reg"); n != 0 {
		t.Fatalf("%d in flight after Close", n)
	}
	m.fail = true
	if _, err := f.Fetch(context.Background(), 0, 1); err == nil {
		t.Fatal("no error")
	}
	if n, _ := g.InFlight("reg"); n != 0 {
		t.Fatalf("%d in flight after a failed fetch", n)
	}
	if m.got[0] != Background || m.got[1] != Demand {
		t.Fatalf("priorities seen %v", m.got)
	}
	if Fetcher(nil, "reg", m) != RangeFetcher(m) {
		t.Fatal("a nil gate wraps")
	}
}

func TestTransportAndMetrics(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("hello"))
	}))
	defer srv.Close()
	reg := prometheus.NewRegistry()
	g := New(8, WithRegisterer(reg))
	base := &http.Transport{}
	defer base.CloseIdleConnections()
	c := &http.Client{Transport: Transport(g, base, Seed)}
	host := strings.TrimPrefix(srv.URL, "http://")

	req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := g.InFlight(host); n != 1 {
		t.Fatalf("%d in flight with a body open", n)
	}
	if v := testutil.ToFloat64(g.m.inflight[Seed]); v != 1 {
		t.Fatalf("in-flight gauge for seed %v", v)
	}
	_, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if n, _ := g.InFlight(host); n != 0 {
		t.Fatalf("%d in flight after Close", n)
	}
	req, _ = http.NewRequestWithContext(WithPriority(context.Background(), Demand), http.MethodGet, srv.URL, nil)
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if testutil.ToFloat64(g.m.requests[Seed]) != 1 || testutil.ToFloat64(g.m.requests[Demand]) != 1 {
		t.Fatal("requests by priority not counted")
	}
	if n, err := testutil.GatherAndCount(reg, "starling_origin_requests_total", "starling_origin_requests_in_flight",
		"starling_origin_requests_queued", "starling_origin_queue_wait_seconds_total"); err != nil || n != 16 {
		t.Fatalf("registered series %d, %v", n, err)
	}
}
