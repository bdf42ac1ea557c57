package scheduler

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestManyRequestersOneOriginFetch(t *testing.T) {
	s := New(Options{StartGrace: -1})
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
	s := New(Options{StartGrace: -1})
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
	s := New(Options{PeerTTL: 10 * time.Second, FetchTTL: time.Minute, StartGrace: -1, Now: func() time.Time { return now }})
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
	s := New(Options{MaxParents: 3, StartGrace: -1})
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

// clock is a settable time for tests of TTLs.
type clock struct{ now time.Time }

func (c *clock) Now() time.Time      { return c.now }
func (c *clock) add(d time.Duration) { c.now = c.now.Add(d) }
func newClock() *clock               { return &clock{now: time.Unix(1000, 0)} }

// ttlOptions are short TTLs on a test clock, without the start grace
// (TestStartGraceWaitsForReannounce tests it).
func ttlOptions(c *clock) Options {
	return Options{PeerTTL: 10 * time.Second, FetchTTL: time.Minute, StartGrace: -1, Now: c.Now}
}
func answer(a Assignment) string {
	switch {
	case len(a.Parents) > 0:
		ids := ""
		for _, p := range a.Parents {
			ids += "," + p.ID
		}
		return "parents" + ids
	case a.BackToSource:
		return "origin"
	case a.Wait:
		return "wait"
	}
	return "nothing"
}

func sched1(s *Scheduler, peer, task string, n int) string {
	return answer(s.Schedule(peer, task, []int{n})[0])
}

func TestSeedClaimLapsesAfterFetchTTL(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	heartbeat := func() {
		s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
		s.Announce(Peer{ID: "a", Capacity: 4})
		s.Announce(Peer{ID: "b", Capacity: 4})
	}
	heartbeat()
	s.Enqueue(Work{TaskID: "t", URL: "http://origin/t"})
	s.RegisterTask("seed", Work{TaskID: "t", URL: "http://origin/t"}, 10, 4) // the seed starts the task
	if got := sched1(s, "a", "t", 0); got != "wait" {
		t.Fatalf("a while the seed is handed the piece: %s", got)
	}
	c.add(59 * time.Second)
	heartbeat()
	if got := sched1(s, "b", "t", 0); got != "wait" {
		t.Fatalf("b before the seed's claim ran out: %s", got)
	}
	c.add(2 * time.Second) // the seed is alive but never fetched the piece
	heartbeat()
	if got := sched1(s, "b", "t", 0); got != "origin" {
		t.Fatalf("b after the stuck seed's claim ran out: %s", got)
	}
	if got := sched1(s, "a", "t", 0); got != "wait" {
		t.Fatalf("a while b fetches: %s", got)
	}
	if got := sched1(s, "seed", "t", 0); got != "wait" {
		t.Fatalf("the seed while b fetches: %s", got)
	}
	// Another piece still goes to the seed: only piece 0 lapsed.
	if got := sched1(s, "a", "t", 1); got != "wait" {
		t.Fatalf("a for piece 1: %s", got)
	}
	if got := sched1(s, "seed", "t", 1); got != "origin" {
		t.Fatalf("the seed for the piece handed to it: %s", got)
	}
}

func TestDeadSeedLosesPiece(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.Enqueue(Work{TaskID: "t", URL: "http://origin/t"})
	if got := sched1(s, "a", "t", 0); got != "wait" {
		t.Fatalf("a: %s", got)
	}
	c.add(11 * time.Second) // the seed stopped heartbeating
	s.Announce(Peer{ID: "a", Capacity: 4})
	if got := sched1(s, "a", "t", 0); got != "origin" {
		t.Fatalf("a after the seed died: %s", got)
	}
}

func TestSeedStartingRenewsItsClaim(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	heartbeat := func() {
		s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
		s.Announce(Peer{ID: "a", Capacity: 4})
	}
	heartbeat()
	s.Enqueue(Work{TaskID: "t", URL: "http://origin/t"})
	s.RegisterTask("seed", Work{TaskID: "t", URL: "http://origin/t"}, 10, 4)
	sched1(s, "a", "t", 0) // hands piece 0 to the seed
	c.add(50 * time.Second)
	heartbeat()
	if got := sched1(s, "seed", "t", 0); got != "origin" {
		t.Fatalf("the seed starting its piece: %s", got)
	}
	c.add(20 * time.Second) // past the first deadline, within the renewed one
	heartbeat()
	if got := sched1(s, "a", "t", 0); got != "wait" {
		t.Fatalf("a while the seed fetches: %s", got)
	}
}

func TestRegisterTask(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	w := Work{TaskID: "t", URL: "http://origin/t", Header: map[string][]string{"Authorization": {"Bearer x"}}, Digest: "sha256:00"}

	// No seed: nothing queued, the plain peer fetches.
	s.Announce(Peer{ID: "a", Capacity: 4})
	if l, ps, seed := s.RegisterTask("a", w, 10, 4); l != 10 || ps != 4 || seed != "" {
		t.Fatalf("register without a seed: %d %d %q", l, ps, seed)
	}
	if l, ps, _ := s.RegisterTask("a", w, 20, 8); l != 10 || ps != 4 {
		t.Fatalf("the first size did not win: %d %d", l, ps)
	}

	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
	// A seed's own registration queues nothing for seeds.
	if _, _, seed := s.RegisterTask("seed", Work{TaskID: "u", URL: "http://origin/u"}, 10, 4); seed != "" {
		t.Fatalf("a seed's registration was queued for %q", seed)
	}
	if _, _, seed := s.RegisterTask("a", w, 10, 4); seed != "seed" {
		t.Fatalf("a plain peer's registration was queued for %q", seed)
	}
	if _, _, seed := s.RegisterTask("b", w, 10, 4); seed != "" {
		t.Fatalf("queued a second time, for %q", seed)
	}
	work := s.TakeWork("seed")
	if len(work) != 1 || work[0].URL != w.URL || work[0].Header["Authorization"][0] != "Bearer x" || work[0].Digest != w.Digest {
		t.Fatalf("seed work %+v", work)
	}
	if got := sched1(s, "b", "t", 1); got != "wait" {
		t.Fatalf("b while the seed fetches: %s", got)
	}

	// The seed dies before fetching: the next registration goes to another seed.
	c.add(11 * time.Second)
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.Announce(Peer{ID: "seed2", Seed: true, Capacity: 8})
	if _, _, seed := s.RegisterTask("a", w, 10, 4); seed != "seed2" {
		t.Fatalf("after the seed died, queued for %q", seed)
	}
}

func TestAnnounceKnownAndFull(t *testing.T) {
	s := New(Options{StartGrace: -1})
	if s.Announce(Peer{ID: "a", Capacity: 4}) {
		t.Fatal("a new peer was known")
	}
	if !s.Announce(Peer{ID: "a", Capacity: 4}) {
		t.Fatal("an announced peer was not known")
	}
	s.Announce(Peer{ID: "b", Capacity: 4})
	s.ReportPieces("a", "t1", 8, 4, map[int]string{0: "d0", 1: "d1"})
	s.ReportPiece("b", "t2", 0, "e0", 4, 4)
	// a restarted with only piece 1 of t1 and another digest for t2's piece 0.
	if !s.AnnounceFull(Peer{ID: "a", Capacity: 4}, []HeldTask{
		{TaskID: "t1", Length: 8, PieceSize: 4, Pieces: map[int]string{1: "d1"}},
		{TaskID: "t2", Length: 4, PieceSize: 4, Pieces: map[int]string{0: "other"}},
		{TaskID: "t3", Length: 4, PieceSize: 4, Pieces: map[int]string{0: "f0"}},
	}) {
		t.Fatal("a full announce of a known peer said unknown")
	}
	s.Announce(Peer{ID: "c", Capacity: 4})
	got := []string{sched1(s, "c", "t1", 0), sched1(s, "c", "t1", 1), sched1(s, "c", "t2", 0), sched1(s, "c", "t3", 0)}
	want := []string{"origin", "parents,a", "parents,b", "parents,a"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after a full announce: %v, want %v", got, want)
	}
}

func TestTaskStatus(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	if _, ok := s.TaskStatus("t"); ok {
		t.Fatal("an unknown task has a status")
	}
	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.Announce(Peer{ID: "gone", Capacity: 4})
	s.ReportPieces("gone", "t", 10, 4, map[int]string{0: "d0", 1: "d1", 2: "d2"})
	c.add(11 * time.Second)
	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.ReportPieces("seed", "t", 10, 4, map[int]string{0: "d0", 1: "d1", 2: "d2"})
	s.ReportPieces("a", "t", 10, 4, map[int]string{0: "d0", 1: "d1"})
	st, ok := s.TaskStatus("t")
	want := TaskStatus{TaskID: "t", Length: 10, PieceSize: 4, Pieces: 3, Complete: 1, SeedsComplete: 1, Fetched: 3}
	if !ok || st != want {
		t.Fatalf("status %+v, want %+v", st, want)
	}
	s.ReportPiece("a", "t", 2, "d2", 10, 4)
	if st, _ := s.TaskStatus("t"); st.Complete != 2 || st.SeedsComplete != 1 {
		t.Fatalf("status %+v", st)
	}
	if complete, pieces := s.Holders("t"); complete != 2 || pieces != 3 {
		t.Fatalf("holders %d of %d pieces", complete, pieces)
	}
}

func TestGCPurgesDeadPeersAndTasks(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	s.Announce(Peer{ID: "seed1", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.ReportPiece("a", "t", 0, "d0", 4, 4)
	seed, _ := s.Enqueue(Work{TaskID: "w", URL: "http://origin/w"})
	if seed != "seed1" {
		t.Fatalf("work went to %q", seed)
	}
	c.add(5 * time.Second)
	s.Announce(Peer{ID: "seed2", Seed: true, Capacity: 8})
	c.add(6 * time.Second) // a and seed1 are dead, seed2 is not
	s.Announce(Peer{ID: "seed2", Seed: true, Capacity: 8})
	if peers, tasks := s.GC(); peers != 2 || tasks != 1 {
		t.Fatalf("purged %d peers and %d tasks, want 2 and 1 (t; w still has work)", peers, tasks)
	}
	if peers, seeds, tasks := s.Stats(); peers != 1 || seeds != 1 || tasks != 1 {
		t.Fatalf("after GC: %d peers, %d seeds, %d tasks", peers, seeds, tasks)
	}
	if w := s.TakeWork("seed2"); len(w) != 1 || w[0].TaskID != "w" {
		t.Fatalf("the dead seed's work did not move: %+v", w)
	}
	if s.Announce(Peer{ID: "a", Capacity: 4}) {
		t.Fatal("a purged peer was still known")
	}

	// A seed that took a task and died: the task moves to a live seed.
	s.Announce(Peer{ID: "seed3", Seed: true, Capacity: 8})
	s.RegisterTask("a", Work{TaskID: "x", URL: "http://origin/x"}, 4, 4)
	took := ""
	for _, id := range []string{"seed2", "seed3"} {
		if len(s.TakeWork(id)) == 1 {
			took = id
		}
	}
	other := map[string]string{"seed2": "seed3", "seed3": "seed2"}[took]
	c.add(6 * time.Second)
	s.Announce(Peer{ID: other, Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	c.add(6 * time.Second)
	s.Announce(Peer{ID: other, Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "a", Capacity: 4})
	s.GC()
	moved := map[string]string{}
	for _, w := range s.TakeWork(other) {
		moved[w.TaskID] = w.URL
	}
	if moved["x"] != "http://origin/x" || (took == "seed2" && moved["w"] != "http://origin/w") {
		t.Fatalf("the tasks of the dead seed %s did not move to %s: %v", took, other, moved)
	}
}

func TestLeaveMovesQueuedWork(t *testing.T) {
	s := New(Options{StartGrace: -1})
	s.Announce(Peer{ID: "s1", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "s2", Seed: true, Capacity: 8})
	first, _ := s.Enqueue(Work{TaskID: "t", URL: "http://origin/t"})
	other := map[string]string{"s1": "s2", "s2": "s1"}[first]
	s.Leave(first)
	if w := s.TakeWork(other); len(w) != 1 {
		t.Fatalf("work of the seed that left: %+v", w)
	}
}

func TestBusyHoldersMeanWait(t *testing.T) {
	s := New(Options{StartGrace: -1})
	s.Announce(Peer{ID: "full", Capacity: 2, Load: 2})
	s.Announce(Peer{ID: "me", Capacity: 2})
	s.ReportPiece("full", "t", 0, "d0", 4, 4)
	if got := sched1(s, "me", "t", 0); got != "wait" {
		t.Fatalf("with the only holder busy: %s, want wait (not a second origin fetch)", got)
	}
	s.ReportBadParent("me", "t", "full")
	if got := sched1(s, "me", "t", 0); got != "origin" {
		t.Fatalf("with the only holder refused: %s", got)
	}
}

func TestOtherPieceSizeIgnored(t *testing.T) {
	s := New(Options{StartGrace: -1})
	s.Announce(Peer{ID: "a", Capacity: 2})
	s.Announce(Peer{ID: "b", Capacity: 2})
	s.Announce(Peer{ID: "me", Capacity: 2})
	s.RegisterTask("me", Work{TaskID: "t"}, 8, 4)
	s.ReportPiece("a", "t", 0, "d0", 8, 2) // cut in 2-byte pieces: other bytes
	s.ReportPiece("b", "t", 9, "d9", 8, 4) // out of range
	if got := sched1(s, "me", "t", 0); got != "origin" {
		t.Fatalf("a holder of a differently cut task was offered: %s", got)
	}
	if st, _ := s.TaskStatus("t"); st.Fetched != 0 || st.Pieces != 2 {
		t.Fatalf("status %+v", st)
	}
}

func TestSeedThatNeverStartsLosesPieceSoon(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c)) // SeedStartTTL 10s by default
	heartbeat := func() {
		s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
		s.Announce(Peer{ID: "a", Capacity: 4})
	}
	heartbeat()
	if _, _, seed := s.RegisterTask("a", Work{TaskID: "t", URL: "http://origin/t"}, 10, 4); seed != "seed" {
		t.Fatalf("queued for %q", seed)
	}
	if got := sched1(s, "a", "t", 0); got != "wait" {
		t.Fatalf("a: %s", got)
	}
	c.add(9 * time.Second)
	heartbeat()
	if got := sched1(s, "a", "t", 0); got != "wait" {
		t.Fatalf("a within the seed's start time: %s", got)
	}
	c.add(2 * time.Second) // the seed took the work but never started it
	heartbeat()
	if got := sched1(s, "a", "t", 0); got != "origin" {
		t.Fatalf("a after the seed failed to start: %s", got)
	}
}

func TestOffersCountAgainstFreeSlots(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	s.Announce(Peer{ID: "parent", Capacity: 2})
	for _, id := range []string{"a", "b", "c"} {
		s.Announce(Peer{ID: id, Capacity: 2})
	}
	s.ReportPiece("parent", "t", 0, "d0", 4, 4)
	got := []string{sched1(s, "a", "t", 0), sched1(s, "b", "t", 0), sched1(s, "c", "t", 0)}
	if fmt.Sprint(got) != "[parents,parent parents,parent wait]" {
		t.Fatalf("a parent with 2 slots offered: %v", got)
	}
	s.Announce(Peer{ID: "parent", Capacity: 2}) // a heartbeat does not forget the offers
	if got := sched1(s, "c", "t", 0); got != "wait" {
		t.Fatalf("after a heartbeat: %s", got)
	}
	c.add(2 * time.Second)
	s.Announce(Peer{ID: "parent", Capacity: 2, Load: 1}) // one upload running
	if got := sched1(s, "c", "t", 0); got != "parents,parent" {
		t.Fatalf("after the offers aged: %s", got)
	}
	// Load and offers estimate the same uploads: the larger counts.
	if got := sched1(s, "a", "t", 0); got != "parents,parent" {
		t.Fatalf("with one upload running and one offered: %s", got)
	}
	if got := sched1(s, "b", "t", 0); got != "wait" {
		t.Fatalf("with both slots offered: %s", got)
	}
	// A requester that reports the piece ends its upload at once.
	s.ReportPiece("a", "t", 0, "d0", 4, 4)
	if got := sched1(s, "b", "t", 0); got == "wait" {
		t.Fatalf("after a finished upload: %s", got)
	}
}

func TestFinishedSeedTaskNotHandedOver(t *testing.T) {
	s := New(Options{StartGrace: -1})
	s.Announce(Peer{ID: "s1", Seed: true, Capacity: 8})
	s.Announce(Peer{ID: "s2", Seed: true, Capacity: 8})
	seed, _ := s.Enqueue(Work{TaskID: "t", URL: "http://origin/t"})
	other := map[string]string{"s1": "s2", "s2": "s1"}[seed]
	s.TakeWork(seed)
	s.ReportPieces(seed, "t", 8, 4, map[int]string{0: "d0", 1: "d1"})
	s.Leave(seed)
	if w := s.TakeWork(other); len(w) != 0 {
		t.Fatalf("a task the seed had finished was handed over: %+v", w)
	}
}

// However many peers start a whole blob at once, only MaxOriginFetchers of
// them fetch it from the origin; the others wait for its pieces to appear.
// A fetcher whose claims end (reported, lapsed, dead) makes room.
func TestOriginFetchersBounded(t *testing.T) {
	c := newClock()
	s := New(ttlOptions(c))
	w := Work{TaskID: "t", URL: "http://origin/t"}
	for i := range 6 {
		id := fmt.Sprintf("p%d", i)
		s.Announce(Peer{ID: id, Capacity: 4})
		s.RegisterTask(id, w, 64, 1)
	}
	fetching := map[string]int{}
	for i := range 6 {
		id := fmt.Sprintf("p%d", i)
		for _, a := range s.Schedule(id, "t", []int{4 * i, 4*i + 1, 4*i + 2, 4*i + 3}) {
			if a.BackToSource {
				fetching[id]++
			} else if !a.Wait {
				t.Fatalf("%s piece %d: %+v, want origin or wait", id, a.Piece, a)
			}
		}
	}
	if len(fetching) != 2 || fetching["p0"] != 4 || fetching["p1"] != 4 {
		t.Fatalf("origin claims by peer %v, want p0 and p1 with 4 each", fetching)
	}
	// A fetcher takes more pieces; a waiting peer still does not.
	if got := sched1(s, "p1", "t", 40); got != "origin" {
		t.Fatalf("a fetcher's next piece: %s", got)
	}
	if got := sched1(s, "p2", "t", 41); got != "wait" {
		t.Fatalf("a third fetcher: %s", got)
	}
	// p0 reports its pieces: its claims are over, and p2 may fetch.
	s.ReportPieces("p0", "t", 64, 1, map[int]string{0: "d0", 1: "d1", 2: "d2", 3: "d3"})
	if got := sched1(s, "p2", "t", 41); got != "origin" {
		t.Fatalf("after a fetcher finished: %s", got)
	}
	// p1 dies: once it is stale its claims no longer count.
	c.add(11 * time.Second)
	for _, id := range []string{"p0", "p2", "p3"} {
		s.Announce(Peer{ID: id, Capacity: 4})
	}
	if got := sched1(s, "p3", "t", 42); got != "origin" {
		t.Fatalf("after a fetcher died: %s", got)
	}
	// A seed is never held back, nor counted.
	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8})
	if got := sched1(s, "seed", "t", 50); got != "origin" {
		t.Fatalf("seed: %s", got)
	}
	// A task registered without a URL (lazy reads) is not limited.
	for i := range 4 {
		id := fmt.Sprintf("p%d", i)
		s.Announce(Peer{ID: id, Capacity: 4})
		if got := sched1(s, id, "lazy", i); got != "origin" {
			t.Fatalf("lazy task, %s: %s", id, got)
		}
	}
}

// For StartGrace after a (re)start nobody is sent to the origin: the
// peers that hold a piece may not have re-announced it yet. Pieces
// re-announced meanwhile come from their holders.
func TestStartGraceWaitsForReannounce(t *testing.T) {
	c := newClock()
	o := ttlOptions(c)
	o.StartGrace = 0 // the default, 3 s
	s := New(o)
	s.AnnounceFull(Peer{ID: "a", Capacity: 4}, []HeldTask{{TaskID: "t", Length: 4, PieceSize: 1, Pieces: map[int]string{0: "d0"}}})
	s.Announce(Peer{ID: "seed", Seed: true, Capacity: 4})
	s.Announce(Peer{ID: "x", Capacity: 4})
	s.RegisterTask("seed", Work{TaskID: "t", URL: "http://origin/t"}, 4, 1)
	s.RegisterTask("x", Work{TaskID: "other", URL: "http://origin/other"}, 4, 1)
	// Nor for a task this scheduler has no registration of (a peer that
	// missed the restart asks without registering again). Lazy reads claim
	// ranges, not pieces, and have no grace (ranges_test.go).
	if got := sched1(s, "x", "unregistered", 0); got != "wait" {
		t.Fatalf("unregistered task: %s", got)
	}
	if got := sched1(s, "seed", "t", 1); got != "wait" {
		t.Fatalf("seed, piece nobody re-announced yet: %s", got)
	}
	if got := sched1(s, "seed", "t", 0); got != "parents,a" {
		t.Fatalf("seed, re-announced piece: %s", got)
	}
	if got := sched1(s, "x", "other", 0); got != "wait" {
		t.Fatalf("another task, nobody announced it: %s", got)
	}
	// b re-announces piece 1 within the grace: nobody fetches it again.
	c.add(time.Second)
	s.AnnounceFull(Peer{ID: "b", Capacity: 4}, []HeldTask{{TaskID: "t", Length: 4, PieceSize: 1, Pieces: map[int]string{1: "d1"}}})
	if got := sched1(s, "seed", "t", 1); got != "parents,b" {
		t.Fatalf("seed, piece b re-announced: %s", got)
	}
	c.add(2 * time.Second)
	if got := sched1(s, "seed", "t", 2); got != "origin" {
		t.Fatalf("after the grace: %s", got)
	}
	if got := sched1(s, "seed", "other", 0); got != "origin" {
		t.Fatalf("another task after the grace: %s", got)
	}
}

// BenchmarkWholeTask is the scheduler's work for one 128-piece task that a
// seed and 8 peers fetch: every peer asks for its next pieces (8 at a
// time, waits included) and reports each piece it gets, until all hold
// everything. go test -bench WholeTask -cpuprofile shows where it goes.
func BenchmarkWholeTask(b *testing.B) {
	const pieces, peers = 128, 8
	digest := fmt.Sprintf("%064x", 1)
	for range b.N {
		c := newClock()
		s := New(ttlOptions(c))
		s.Announce(Peer{ID: "seed", Seed: true, Capacity: 8, IP: "10.0.0.1", UploadPort: 1})
		w := Work{TaskID: "t", URL: "http://origin/t"}
		ids := []string{"seed"}
		for i := range peers {
			id := fmt.Sprintf("p%d", i)
			ids = append(ids, id)
			s.Announce(Peer{ID: id, Capacity: 8, IP: "10.0.0.2", UploadPort: 1})
			s.RegisterTask(id, w, pieces, 1)
		}
		s.RegisterTask("seed", w, pieces, 1)
		have := map[string]int{} // next piece each peer lacks (in order)
		for done := 0; done < len(ids); {
			done = 0
			c.add(10 * time.Millisecond)
			for _, id := range ids {
				next := have[id]
				if next >= pieces {
					done++
					continue
				}
				ask := make([]int, 0, 8)
				for n := next; n < min(next+8, pieces); n++ {
					ask = append(ask, n)
				}
				got := map[int]string{}
				for _, a := range s.Schedule(id, "t", ask) {
					if a.BackToSource || len(a.Parents) > 0 {
						got[a.Piece] = digest
					}
				}
				// Pieces arrive in order here: report the run from next.
				k := next
				for ; got[k] != ""; k++ {
				}
				if k > next {
					rep := map[int]string{}
					for n := next; n < k; n++ {
						rep[n] = digest
					}
					s.ReportPieces(id, "t", pieces, 1, rep)
					have[id] = k
				}
			}
		}
	}
}
