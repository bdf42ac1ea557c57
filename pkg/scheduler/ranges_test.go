package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func rangeReq(peer string, off, n int64) RangeRequest {
	return RangeRequest{PeerID: peer, TaskID: "sha256:ab", Length: 1000, Range: Range{off, n}}
}

func describe(segs []Segment) string {
	out := ""
	for _, s := range segs {
		switch {
		case s.BackToSource:
			out += fmt.Sprintf("[%d+%d origin]", s.Off, s.Len)
		default:
			ids := ""
			for _, p := range s.Parents {
				ids += " " + p.ID
			}
			out += fmt.Sprintf("[%d+%d from%s]", s.Off, s.Len, ids)
		}
	}
	return out
}

func schedRange(t *testing.T, s *Scheduler, req RangeRequest) string {
	t.Helper()
	segs, err := s.ScheduleRange(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	return describe(segs)
}

func TestRangeNobodyHoldsGoesToOrigin(t *testing.T) {
	s := New(Options{})
	s.Announce(Peer{ID: "a", Capacity: 4})
	if got := schedRange(t, s, rangeReq("a", 100, 50)); got != "[100+50 origin]" {
		t.Fatalf("segments %s", got)
	}
	// Asking again (a retry) is fetching again.
	if got := schedRange(t, s, rangeReq("a", 100, 50)); got != "[100+50 origin]" {
		t.Fatalf("retry: segments %s", got)
	}
}

// Concurrent readers of the same bytes: one fetches them from the origin,
// the others are sent to it (it streams them as they arrive).
func TestRangeConcurrentReadersOneOriginFetch(t *testing.T) {
	s := New(Options{})
	const peers = 50
	for i := 0; i < peers; i++ {
		s.Announce(Peer{ID: fmt.Sprint("p", i), Capacity: 4})
	}
	var mu sync.Mutex
	origin, streamed := 0, 0
	var wg sync.WaitGroup
	for i := 0; i < peers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			segs, err := s.ScheduleRange(context.Background(), rangeReq(fmt.Sprint("p", i), 0, 300))
			if err != nil || len(segs) != 1 {
				t.Errorf("segments %s, %v", describe(segs), err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case segs[0].BackToSource:
				origin++
			case len(segs[0].Parents) == 1:
				streamed++
			default:
				t.Errorf("segment %s", describe(segs))
			}
		}()
	}
	wg.Wait()
	if origin != 1 || streamed != peers-1 {
		t.Fatalf("%d origin fetches and %d streamed of one range by %d concurrent readers", origin, streamed, peers)
	}
}

// A claim ends when its holder holds the range or releases it, leaves,
// or lets FetchTTL pass.
func TestRangeClaimLifetime(t *testing.T) {
	now := time.Unix(1000, 0)
	s := New(Options{FetchTTL: 10 * time.Second, Now: func() time.Time { return now }})
	for _, id := range []string{"a", "b"} {
		s.Announce(Peer{ID: id, Capacity: 4})
	}
	schedRange(t, s, rangeReq("a", 0, 100))
	if got := schedRange(t, s, rangeReq("b", 0, 100)); got != "[0+100 from a]" {
		t.Fatalf("segments %s", got)
	}
	// Verified chunk by chunk: the claim ends with its last chunk.
	if err := s.ReportRanges("a", "sha256:ab", 1000, []Range{{0, 60}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ReportRanges("a", "sha256:ab", 1000, []Range{{60, 40}}, nil); err != nil {
		t.Fatal(err)
	}
	if n := len(s.tasks["sha256:ab"].rng.claims); n != 0 {
		t.Fatalf("%d claims left after the range was held", n)
	}
	if got := schedRange(t, s, rangeReq("b", 0, 100)); got != "[0+100 from a]" {
		t.Fatalf("held: segments %s", got)
	}
	// Released: the next reader fetches it.
	schedRange(t, s, rangeReq("a", 200, 100))
	_ = s.ReportRanges("a", "sha256:ab", 1000, nil, []Range{{200, 100}})
	if got := schedRange(t, s, rangeReq("b", 200, 100)); got != "[200+100 origin]" {
		t.Fatalf("released: segments %s", got)
	}
	// Expired: so is a claim whose holder never reports.
	schedRange(t, s, rangeReq("a", 400, 100))
	now = now.Add(11 * time.Second)
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.Announce(Peer{ID: "b", Capacity: 4})
	if got := schedRange(t, s, rangeReq("b", 400, 100)); got != "[400+100 origin]" {
		t.Fatalf("expired: segments %s", got)
	}
}

// Held ranges, whole pieces, claims and gaps make one answer, in order.
func TestRangeMixedSegments(t *testing.T) {
	s := New(Options{})
	for _, id := range []string{"a", "b", "c", "r"} {
		s.Announce(Peer{ID: id, Capacity: 4})
	}
	s.RegisterTask("c", Work{TaskID: "sha256:ab"}, 1000, 100)
	if err := s.ReportRanges("a", "sha256:ab", 1000, []Range{{0, 50}}, nil); err != nil {
		t.Fatal(err)
	}
	s.ReportPieces("c", "sha256:ab", 1000, 100, map[int]string{3: fmt.Sprintf("%064x", 3)})
	// b is fetching 60..80 now.
	schedRange(t, s, rangeReq("b", 60, 20))
	// 10..50 from a; 50..60 origin; 60..80 from b (in flight); 80..300
	// origin; 300..400 c's piece 3.
	if got := schedRange(t, s, rangeReq("r", 10, 390)); got != "[10+40 from a][50+10 origin][60+20 from b][80+220 origin][300+100 from c]" {
		t.Fatalf("segments %s", got)
	}
	// A departed holder or fetcher is not offered.
	s.Leave("a")
	s.Leave("b")
	if got := schedRange(t, s, rangeReq("r", 10, 40)); got != "[10+40 origin]" {
		t.Fatalf("after a left: segments %s", got)
	}
	if got := schedRange(t, s, rangeReq("c", 60, 20)); got != "[60+20 origin]" {
		t.Fatalf("after b left: segments %s", got)
	}
	// A parent the requester refused is not offered to it again.
	s.ReportBadParent("r", "sha256:ab", "c")
	if got := schedRange(t, s, rangeReq("r", 300, 100)); got != "[300+100 origin]" {
		t.Fatalf("refused parent: segments %s", got)
	}
}

func TestRangeInvalid(t *testing.T) {
	s := New(Options{})
	for _, req := range []RangeRequest{
		rangeReq("a", -1, 10), rangeReq("a", 995, 10), rangeReq("a", 0, 0),
		{PeerID: "a", TaskID: "t", Length: 0, Range: Range{0, 1}},
		{PeerID: "a", TaskID: "t", Length: 1 << 62, Range: Range{1<<62 - 1, 1 << 62}},
	} {
		if _, err := s.ScheduleRange(context.Background(), req); !errors.Is(err, ErrRangeInvalid) {
			t.Errorf("%+v: %v", req, err)
		}
	}
	s.RegisterTask("a", Work{TaskID: "sha256:ab"}, 500, 100)
	if _, err := s.ScheduleRange(context.Background(), rangeReq("a", 0, 10)); !errors.Is(err, ErrRangeInvalid) {
		t.Errorf("a length other than the registered one: %v", err)
	}
	if err := s.ReportRanges("a", "sha256:ab", 1000, []Range{{0, 10}}, nil); !errors.Is(err, ErrRangeInvalid) {
		t.Errorf("a report with another length: %v", err)
	}
}

// A full announce replaces a peer's ranges.
func TestRangeFullAnnounce(t *testing.T) {
	s := New(Options{})
	s.Announce(Peer{ID: "r", Capacity: 4})
	s.AnnounceFull(Peer{ID: "a", Capacity: 4}, []HeldTask{{TaskID: "sha256:ab", Ranges: []Range{{0, 100}}}})
	if got := schedRange(t, s, rangeReq("r", 0, 100)); got != "[0+100 from a]" {
		t.Fatalf("segments %s", got)
	}
	s.AnnounceFull(Peer{ID: "a", Capacity: 4}, nil)
	if got := schedRange(t, s, rangeReq("r", 0, 100)); got != "[0+100 origin]" {
		t.Fatalf("after an empty full announce: segments %s", got)
	}
}
