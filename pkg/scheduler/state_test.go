package scheduler

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestManyRequestersOneOriginFetch(t *testing.T) {
	s := New(Options{})
	const peers = 100
	for i := 0; i < peers; i++ {
		s.Announce(Peer{ID: fmt.Sprint("p", i), Capacity: 4})
	}
	var origin, waits atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < peers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, a := range s.Schedule(fmt.Sprint("p", i), "task", []int{0, 1, 2}) {
				if a.BackToSource {
					origin.Add(1)
				}
				if a.Wait {
					waits.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if origin.Load() != 3 || waits.Load() != 3*peers-3 {
		t.Fatalf("%d origin fetches and %d waits for 3 pieces and %d peers", origin.Load(), waits.Load(), peers)
	}
}

func TestSeedFetchesFromOrigin(t *testing.T) {
	s := New(Options{})
	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	if _, ok := s.Enqueue(Work{TaskID: "task"}); !ok {
		t.Fatal("no seed took the work")
	}
	if a := s.Schedule("a", "task", []int{0})[0]; !a.Wait {
		t.Fatalf("a plain peer was not told to wait for the seed: %+v", a)
	}
	if a := s.Schedule("seed", "task", []int{0})[0]; !a.BackToSource {
		t.Fatalf("the seed was not told to fetch: %+v", a)
	}
	s.ReportPiece("seed", "task", 0, "d0", 10, 4)
	a := s.Schedule("a", "task", []int{0})[0]
	if len(a.Parents) != 1 || a.Parents[0].ID != "seed" || a.Digest != "d0" {
		t.Fatalf("after the seed has it: %+v", a)
	}
}

func TestFetchReassignedWhenFetcherDies(t *testing.T) {
	now := time.Unix(1000, 0)
	s := New(Options{PeerTTL: 10 * time.Second, FetchTTL: time.Minute, Now: func() time.Time { return now }})
	s.Announce(Peer{ID: "a", Capacity: 1})
	s.Announce(Peer{ID: "b", Capacity: 1})
	if !s.Schedule("a", "t", []int{0})[0].BackToSource {
		t.Fatal("first requester not sent to the origin")
	}
	if !s.Schedule("b", "t", []int{0})[0].Wait {
		t.Fatal("second requester not told to wait")
	}
	now = now.Add(20 * time.Second) // a stopped heartbeating
	s.Announce(Peer{ID: "b", Capacity: 1})
	if !s.Schedule("b", "t", []int{0})[0].BackToSource {
		t.Fatal("the piece stayed with a dead fetcher")
	}
}

func TestParentRanking(t *testing.T) {
	s := New(Options{MaxParents: 3})
	s.Announce(Peer{ID: "me", Zone: "z1", Rack: "r1", Capacity: 1})
	s.Announce(Peer{ID: "busy", Zone: "z1", Rack: "r1", Capacity: 4, Load: 4})
	s.Announce(Peer{ID: "far", Zone: "z2", Capacity: 4})
	s.Announce(Peer{ID: "zone", Zone: "z1", Rack: "r2", Capacity: 4})
	s.Announce(Peer{ID: "rack", Zone: "z1", Rack: "r1", Capacity: 4})
	s.Announce(Peer{ID: "idle", Zone: "z2", Capacity: 8})
	s.Announce(Peer{ID: "bad", Zone: "z1", Rack: "r1", Capacity: 9})
	for _, id := range []string{"busy", "far", "zone", "rack", "idle", "bad"} {
		s.ReportPiece(id, "t", 0, "d", 4, 4)
	}
	s.ReportBadParent("me", "t", "bad")
	got := s.Schedule("me", "t", []int{0})[0].Parents
	var ids []string
	for _, p := range got {
		ids = append(ids, p.ID)
	}
	want := []string{"idle", "rack", "zone"}
	if fmt.Sprint(ids) != fmt.Sprint(want) {
		t.Fatalf("parents %v, want %v (most free slots, then nearest; busy and refused ones never)", ids, want)
	}
}

func TestRendezvous(t *testing.T) {
	nodes := []string{"s1:8002", "s2:8002", "s3:8002"}
	counts := map[string]int{}
	moved := 0
	for i := 0; i < 3000; i++ {
		k := fmt.Sprint("task", i)
		n := Pick(k, nodes)
		counts[n]++
		if n != "s2:8002" && Pick(k, []string{"s1:8002", "s3:8002"}) != n {
			moved++
		}
	}
	for _, n := range nodes {
		if counts[n] < 800 {
			t.Fatalf("uneven spread %v", counts)
		}
	}
	if moved != 0 {
		t.Fatalf("%d keys moved that were not on the removed node", moved)
	}
}
