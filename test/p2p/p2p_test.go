package p2p_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"testing"
	"time"
)

// TestP2P is issue 4's multi-host test. Hosts, each its own network
// namespace behind a link shaped with tbf to STARLING_P2P_RATE (default
// 400mbit) both ways: registry (docker-registry behind a counting proxy),
// sched, seed and six peers. In order:
//
//  1. all peers fetch a 256 MiB blob at once: right digest everywhere, at
//     most 1.05 times its bytes from the origin;
//  2. Range requests through a peer, on a blob it lacks and on one it holds;
//  3. a peer SIGKILLed while it is receiving: the others finish right; the
//     restarted peer finishes too;
//  4. with the seed stopped, a peer that corrupts what it uploads holds a
//     blob alone; the others fetch it: right digests, bad pieces counted;
//  5. scheduler stopped: all peers fetch a new blob through the origin;
//  6. scheduler restarted: the peers return to it and P2P works again.
//
// Phases go on after a failure where they can, so one run shows everything
// that is wrong; the logs of all processes are kept when it fails.
//
// The subtest mtls runs phases 1 and 2 again on a cluster whose daemons
// talk mutual TLS (issue 11): the same bound on the origin's bytes, the
// same ranges, and pieces that do travel between peers.
func TestP2P(t *testing.T) {
	t.Run("plain", testP2PPlain)
	t.Run("mtls", testP2PMTLS)
}

func testP2PPlain(t *testing.T) {
	rate := os.Getenv("STARLING_P2P_RATE")
	if rate == "" {
		rate = "400mbit"
	}
	testStart := time.Now()
	c := newCluster(t, "stp", rate)
	seed := c.addNode("seed", "seed")
	var peers []*node
	for i := 1; i <= 6; i++ {
		peers = append(peers, c.addNode(fmt.Sprintf("peer%d", i), "peer"))
	}
	t.Logf("cluster up in %.1f s: registry %s, scheduler %s, seed %s, %d peers, links %s",
		time.Since(testStart).Seconds(), c.regHost.IP, c.schedAddr, seed.host.IP, len(peers), rate)
	phase := func(name string, timeout time.Duration) (context.Context, func()) {
		t.Logf("=== %s (%.0f s into the test)", name, time.Since(testStart).Seconds())
		return context.WithTimeout(context.Background(), timeout)
	}

	// 1. Everybody at once.
	var a blob
	{
		ctx, cancel := phase("all peers fetch 256 MiB at once", 5*time.Minute)
		a = c.pushBlob("p2p/big", 256<<20, 1)
		res := fetchAll(ctx, peers, a, nil)
		cancel()
		checkAll(t, a, res)
		ratio := c.ratio(a)
		t.Logf("256 MiB to %d peers: last peer after %.1f s; origin sent %.3f x the blob (%d requests to the registry so far)",
			len(peers), slowest(res).Seconds(), ratio, c.origin.Requests())
		for _, r := range res {
			t.Logf("  %s: %.1f s", r.node.name, r.elapsed.Seconds())
		}
		logPieceSources(t, append([]*node{seed}, peers...))
		if ratio > 1.05 {
			t.Errorf("the origin sent %.3f times the blob's bytes; want at most 1.05", ratio)
		}
		for _, r := range res {
			if r.err != nil || r.digest != a.digest {
				t.FailNow() // the rest relies on downloads working at all
			}
		}
	}

	// 2. Ranges, first on a blob the peer lacks (it must fetch the pieces
	// that cover each range), then on one it holds.
	{
		ctx, cancel := phase("range requests", 2*time.Minute)
		r := c.pushBlob("p2p/range", 9<<20+12345, 2)
		checkRanges(ctx, t, peers[0], r)
		cancel()
		ctx, cancel = context.WithTimeout(context.Background(), 2*time.Minute)
		checkRanges(ctx, t, peers[0], a)
		cancel()
	}

	// 3. SIGKILL a peer while it receives.
	{
		ctx, cancel := phase("a peer killed mid-transfer", 5*time.Minute)
		b := c.pushBlob("p2p/kill", 96<<20, 3)
		victim := peers[len(peers)-1]
		progs := make([]*progress, len(peers))
		for i := range progs {
			progs[i] = new(progress)
		}
		done := make(chan []fetchResult, 1)
		go func() { done <- fetchAll(ctx, peers, b, progs) }()
		vp := progs[len(progs)-1]
		// Mid-transfer: a quarter in, it holds pieces that others may be
		// fetching from it right now.
		for vp.bytes.Load() < b.size()/4 && !vp.done.Load() && ctx.Err() == nil {
			time.Sleep(2 * time.Millisecond)
		}
		got := vp.bytes.Load()
		up, _ := victim.metric("starling_peer_upload_bytes_total")
		victim.proc.Kill()
		t.Logf("killed %s with SIGKILL after it had received %d of %d bytes (its uploads so far, all blobs: %.0f MiB)",
			victim.name, got, b.size(), up/(1<<20))
		res := <-done
		cancel()
		checkAll(t, b, res[:len(res)-1])
		vr := res[len(res)-1]
		t.Logf("%s's own download: %d bytes, %v; the others' last after %.1f s; origin sent %.3f x the blob",
			victim.name, vr.n, vr.err, slowest(res[:len(res)-1]).Seconds(), c.ratio(b))

		// Restarted on the same root, it serves what it has and finishes.
		victim.start()
		ctx, cancel = context.WithTimeout(context.Background(), 2*time.Minute)
		checkAll(t, b, []fetchResult{victim.fetch(ctx, b, nil)})
		cancel()
	}

	// 4. A peer that corrupts what it uploads. The seed stops first, so
	// that the corrupting peer is the only one holding the blob and the
	// others cannot avoid it.
	{
		ctx, cancel := phase("a peer serving corrupted pieces", 5*time.Minute)
		seed.proc.Stop()
		bad := c.addNode("bad", "peer", "STARLING_TEST_CORRUPT_UPLOADS=1")
		d := c.pushBlob("p2p/corrupt", 48<<20, 4)
		checkAll(t, d, []fetchResult{bad.fetch(ctx, d, nil)})
		before := make([]float64, len(peers))
		for i, p := range peers {
			before[i], _ = p.metric("starling_peer_bad_pieces_total")
		}
		res := fetchAll(ctx, peers, d, nil)
		cancel()
		checkAll(t, d, res)
		var total float64
		var per []string
		for i, p := range peers {
			v, err := p.metric("starling_peer_bad_pieces_total")
			if err != nil {
				t.Error(err)
				continue
			}
			total += v - before[i]
			per = append(per, fmt.Sprintf("%s=%.0f", p.name, v-before[i]))
		}
		up, _ := bad.metric("starling_peer_upload_bytes_total")
		t.Logf("corrupted pieces detected: %s; %s uploaded %.1f MiB; last peer after %.1f s; origin sent %.3f x the blob",
			strings.Join(per, " "), bad.name, up/(1<<20), slowest(res).Seconds(), c.ratio(d))
		if total == 0 {
			t.Errorf("no receiver counted a bad piece (starling_peer_bad_pieces_total), though %s corrupts every piece it uploads and was the only holder", bad.name)
		}
	}

	// 5. Scheduler stopped: every peer goes to the origin itself.
	{
		ctx, cancel := phase("scheduler stopped", 5*time.Minute)
		c.sched.Stop()
		e := c.pushBlob("p2p/nosched", 32<<20, 5)
		res := fetchAll(ctx, peers, e, nil)
		cancel()
		checkAll(t, e, res)
		t.Logf("without scheduler: last peer after %.1f s; origin sent %.2f x the blob", slowest(res).Seconds(), c.ratio(e))
	}

	// 6. Scheduler back: the peers find it again.
	{
		ctx, cancel := phase("scheduler restarted", 3*time.Minute)
		c.startScheduler()
		deadline := time.Now().Add(90 * time.Second)
		for _, p := range peers {
			for {
				v, err := p.metric("starling_peer_scheduler_up")
				if err == nil && v == 1 {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("%s did not reconnect to the restarted scheduler within 90 s (starling_peer_scheduler_up=%v, %v)", p.name, v, err)
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
		f := c.pushBlob("p2p/again", 32<<20, 6)
		res := fetchAll(ctx, peers, f, nil)
		cancel()
		checkAll(t, f, res)
		ratio := c.ratio(f)
		t.Logf("after the scheduler's restart: last peer after %.1f s; origin sent %.3f x the blob", slowest(res).Seconds(), ratio)
		if ratio > 1.05 {
			t.Errorf("after the scheduler's restart the origin sent %.3f times the blob; want at most 1.05", ratio)
		}
	}
	t.Logf("TestP2P took %.0f s", time.Since(testStart).Seconds())
}

// checkRanges sends the Range requests of the issue through n's proxy.
func checkRanges(ctx context.Context, t *testing.T, n *node, b blob) {
	t.Helper()
	s := b.size()
	type want struct {
		status   int
		from, to int64 // inclusive
	}
	cases := []struct {
		rng string
		want
	}{
		{"bytes=-100", want{206, s - 100, s - 1}},
		{"bytes=0-100", want{206, 0, 100}},
		{"bytes=100-", want{206, 100, s - 1}},
		{"bytes=100-500", want{206, 100, 500}},
		// Across a piece boundary, whatever the piece size (a power of two).
		{fmt.Sprintf("bytes=%d-%d", 4<<20-1000, 4<<20+1000), want{206, 4<<20 - 1000, 4<<20 + 1000}},
		{fmt.Sprintf("bytes=%d-", s), want{status: 416}},
		{fmt.Sprintf("bytes=%d-%d", s+100, s+200), want{status: 416}},
	}
	for _, tc := range cases {
		req := n.blobRequest(ctx, b)
		req.Header.Set("Range", tc.rng)
		resp, err := n.client.Do(req)
		if err != nil {
			t.Errorf("%s %s of %s: %v", n.name, tc.rng, b.repo, err)
			continue
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		what := fmt.Sprintf("%s: Range %s of %s (%d bytes)", n.name, tc.rng, b.repo, s)
		if err != nil {
			t.Errorf("%s: reading the body: %v", what, err)
			continue
		}
		if resp.StatusCode != tc.status {
			t.Errorf("%s: status %s, want %d", what, resp.Status, tc.status)
			continue
		}
		if tc.status == http.StatusRequestedRangeNotSatisfiable {
			if cr := resp.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes */%d", s) {
				t.Logf("%s: 416 with Content-Range %q (RFC 9110 says it should be \"bytes */%d\")", what, cr, s)
			}
			continue
		}
		wantCR := fmt.Sprintf("bytes %d-%d/%d", tc.from, tc.to, s)
		if cr := resp.Header.Get("Content-Range"); cr != wantCR {
			t.Errorf("%s: Content-Range %q, want %q", what, cr, wantCR)
		}
		if cl := resp.ContentLength; cl != -1 && cl != tc.to-tc.from+1 {
			t.Errorf("%s: Content-Length %d, want %d", what, cl, tc.to-tc.from+1)
		}
		if string(body) != string(b.data[tc.from:tc.to+1]) {
			t.Errorf("%s: got %d bytes that differ from bytes %d-%d of the blob", what, len(body), tc.from, tc.to)
		}
	}
}

// logPieceSources logs where each node's piece bytes came from.
func logPieceSources(t *testing.T, nodes []*node) {
	t.Helper()
	var parts []string
	for _, n := range nodes {
		parent, err1 := n.metric("starling_peer_piece_bytes_total", `source="parent"`)
		origin, err2 := n.metric("starling_peer_piece_bytes_total", `source="origin"`)
		up, err3 := n.metric("starling_peer_upload_bytes_total")
		if err3 != nil || (err1 != nil && err2 != nil) {
			parts = append(parts, fmt.Sprintf("%s: no metrics", n.name))
			continue
		}
		part := fmt.Sprintf("%s: %.0f MiB from parents, %.0f MiB from the origin, uploaded %.0f MiB",
			n.name, parent/(1<<20), origin/(1<<20), up/(1<<20))
		if bts, err := n.samples("starling_peer_back_to_source_total"); err == nil && len(bts) > 0 {
			var reasons []string
			for l, v := range bts {
				reasons = append(reasons, fmt.Sprintf("%s=%.0f", strings.Trim(strings.TrimPrefix(l, "{reason="), `"}`), v))
			}
			sort.Strings(reasons)
			part += " (origin pieces: " + strings.Join(reasons, " ") + ")"
		}
		parts = append(parts, part)
	}
	t.Logf("pieces: %s", strings.Join(parts, "; "))
}

// testP2PMTLS: a seed and four peers with mTLS fetch 64 MiB at once (at
// most 1.05 times it from the origin, most of it from parents), then the
// ranges of phase 2 on a blob the peer lacks.
func testP2PMTLS(t *testing.T) {
	rate := os.Getenv("STARLING_P2P_RATE")
	if rate == "" {
		rate = "400mbit"
	}
	c := newClusterWith(t, "stm", rate, true)
	seed := c.addNode("seed", "seed")
	var peers []*node
	for i := 1; i <= 4; i++ {
		peers = append(peers, c.addNode(fmt.Sprintf("peer%d", i), "peer"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	a := c.pushBlob("p2p/mtls", 64<<20, 11)
	res := fetchAll(ctx, peers, a, nil)
	checkAll(t, a, res)
	ratio := c.ratio(a)
	t.Logf("64 MiB to %d peers over mTLS: last peer after %.1f s; origin sent %.3f x the blob", len(peers), slowest(res).Seconds(), ratio)
	logPieceSources(t, append([]*node{seed}, peers...))
	if ratio > 1.05 {
		t.Errorf("the origin sent %.3f times the blob's bytes; want at most 1.05", ratio)
	}
	var fromParents float64
	for _, p := range peers {
		v, _ := p.metric("starling_peer_piece_bytes_total", `source="parent"`)
		fromParents += v
	}
	// Four peers and one copy from the origin: at least three copies' worth
	// went peer to peer, over TLS.
	if want := 3 * float64(a.size()) * 0.95; fromParents < want {
		t.Errorf("the peers got %.0f bytes from parents; want at least %.0f (pieces must travel between peers over mTLS)", fromParents, want)
	}
	r := c.pushBlob("p2p/mtls-range", 9<<20+12345, 12)
	checkRanges(ctx, t, peers[0], r)
}
