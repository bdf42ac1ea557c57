// Package scheduler coordinates the peers of a starling P2P network. Its
// state is soft and in memory: peers announce themselves and the pieces
// they hold, and re-announce after a scheduler restart, so nothing is
// persisted. For every piece nobody holds, exactly one peer is told to fetch
// it from the origin — a seed peer when there is one — and the others wait
// for it to appear, so each piece leaves the origin once however many peers
// start at the same moment.
package scheduler

import (
	"sort"
	"sync"
	"time"
)

// Peer is what a peer announces of itself.
type Peer struct {
	ID         string
	IP         string
	UploadPort int
	// Capacity is how many uploads it serves at once; Load how many it is serving.
	Capacity int
	Load     int
	Zone     string
	Rack     string
	Seed     bool
}

// Assignment tells a peer where to get one piece.
type Assignment struct {
	Piece  int
	Digest string // empty until some peer has the piece
	// Parents hold the piece, best first.
	Parents []Peer
	// BackToSource: this peer fetches the piece from the origin.
	BackToSource bool
	// Wait: another peer is fetching it from the origin; ask again shortly.
	Wait bool
}

// Options tunes a Scheduler.
type Options struct {
	// PeerTTL: a peer not heard from for this long is gone.
	PeerTTL time.Duration
	// FetchTTL: an origin fetch not reported done within this long is
	// given to another peer.
	FetchTTL time.Duration
	// MaxParents is how many parents are returned per piece.
	MaxParents int
	Now        func() time.Time
}

type peerState struct {
	Peer
	lastSeen time.Time
}

type pieceState struct {
	digest   string
	holders  map[string]bool
	fetcher  string
	deadline time.Time
}

type taskState struct {
	length    int64
	pieceSize int64
	pieces    map[int]*pieceState
	bad       map[string]map[string]bool // requester -> parents it refuses
	members   map[string]bool            // peers downloading or holding the task
}

// Scheduler is the in-memory state. It is safe for concurrent use.
type Scheduler struct {
	o     Options
	mu    sync.Mutex
	peers map[string]*peerState
	tasks map[string]*taskState
	// work queues tasks for seed peers to fetch (preheat, seed-triggered downloads).
	work map[string][]Work
}

// Work asks a seed peer to download a task.
type Work struct {
	TaskID string
	URL    string
	Header map[string][]string
	Digest string
}

// New returns an empty Scheduler.
func New(o Options) *Scheduler {
	if o.PeerTTL <= 0 {
		o.PeerTTL = 30 * time.Second
	}
	if o.FetchTTL <= 0 {
		o.FetchTTL = 30 * time.Second
	}
	if o.MaxParents <= 0 {
		o.MaxParents = 4
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Scheduler{o: o, peers: map[string]*peerState{}, tasks: map[string]*taskState{}, work: map[string][]Work{}}
}

// Announce records or refreshes a peer (it is also the heartbeat).
func (s *Scheduler) Announce(p Peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peers[p.ID] = &peerState{Peer: p, lastSeen: s.o.Now()}
}

// Leave forgets a peer and everything it held.
func (s *Scheduler) Leave(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.peers, id)
	for _, t := range s.tasks {
		delete(t.members, id)
		for _, p := range t.pieces {
			delete(p.holders, id)
			if p.fetcher == id {
				p.fetcher = ""
			}
		}
	}
}

func (s *Scheduler) alive(id string) bool {
	p, ok := s.peers[id]
	return ok && s.o.Now().Sub(p.lastSeen) <= s.o.PeerTTL
}

func (s *Scheduler) task(id string, length, pieceSize int64) *taskState {
	t, ok := s.tasks[id]
	if !ok {
		t = &taskState{pieces: map[int]*pieceState{}, bad: map[string]map[string]bool{}, members: map[string]bool{}}
		s.tasks[id] = t
	}
	if length > 0 && t.length == 0 {
		t.length, t.pieceSize = length, pieceSize
	}
	return t
}

func (t *taskState) piece(n int) *pieceState {
	p, ok := t.pieces[n]
	if !ok {
		p = &pieceState{holders: map[string]bool{}}
		t.pieces[n] = p
	}
	return p
}

// ReportPiece records that peer holds piece n of a task, with its digest.
// The first digest reported for a piece is the one every receiver checks.
func (s *Scheduler) ReportPiece(peerID, taskID string, n int, digest string, length, pieceSize int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.task(taskID, length, pieceSize)
	t.members[peerID] = true
	p := t.piece(n)
	if p.digest == "" {
		p.digest = digest
	} else if p.digest != digest {
		// A peer holding other bytes is not a holder.
		return
	}
	p.holders[peerID] = true
	if p.fetcher == peerID {
		p.fetcher = ""
	}
}

// ReportBadParent stops offering parent to peer for this task.
func (s *Scheduler) ReportBadParent(peerID, taskID, parent string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.task(taskID, 0, 0)
	if t.bad[peerID] == nil {
		t.bad[peerID] = map[string]bool{}
	}
	t.bad[peerID][parent] = true
}

// Task returns what is known of a task's size.
func (s *Scheduler) Task(taskID string) (length, pieceSize int64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[taskID]
	if !ok || t.length == 0 {
		return 0, 0, false
	}
	return t.length, t.pieceSize, true
}

// Schedule answers a peer that lacks pieces of a task.
func (s *Scheduler) Schedule(peerID, taskID string, pieces []int) []Assignment {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.o.Now()
	t := s.task(taskID, 0, 0)
	t.members[peerID] = true
	req := s.peers[peerID]
	seedFetcher := s.seedFor(t, peerID)
	out := make([]Assignment, 0, len(pieces))
	for _, n := range pieces {
		p := t.piece(n)
		a := Assignment{Piece: n, Digest: p.digest}
		a.Parents = s.rank(t, p, peerID, req)
		if len(a.Parents) > 0 {
			out = append(out, a)
			continue
		}
		fetching := p.fetcher != "" && s.alive(p.fetcher) && now.Before(p.deadline)
		switch {
		case fetching && p.fetcher != peerID:
			a.Wait = true
		case seedFetcher != "" && seedFetcher != peerID:
			// A seed of this task fetches it; the others wait for it.
			a.Wait = true
		default:
			p.fetcher, p.deadline = peerID, now.Add(s.o.FetchTTL)
			a.BackToSource = true
		}
		out = append(out, a)
	}
	return out
}

// seedFor returns a live seed peer that takes part in the task, if any.
func (s *Scheduler) seedFor(t *taskState, requester string) string {
	if r, ok := s.peers[requester]; ok && r.Seed {
		return requester
	}
	var ids []string
	for id := range t.members {
		if p, ok := s.peers[id]; ok && p.Seed && s.alive(id) {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return ""
	}
	sort.Strings(ids)
	return ids[0]
}

// rank lists the live holders of a piece the requester has not refused,
// best first: most free upload slots, then nearest (same rack, same zone),
// then holding most of the task.
func (s *Scheduler) rank(t *taskState, p *pieceState, requester string, req *peerState) []Peer {
	type cand struct {
		Peer
		free, near, held int
	}
	var cs []cand
	for id := range p.holders {
		if id == requester || t.bad[requester][id] || !s.alive(id) {
			continue
		}
		ps := s.peers[id]
		c := cand{Peer: ps.Peer, free: ps.Capacity - ps.Load}
		if c.free <= 0 {
			continue
		}
		if req != nil {
			if req.Zone != "" && req.Zone == ps.Zone {
				c.near++
				if req.Rack != "" && req.Rack == ps.Rack {
					c.near++
				}
			}
		}
		for _, q := range t.pieces {
			if q.holders[id] {
				c.held++
			}
		}
		cs = append(cs, c)
	}
	sort.Slice(cs, func(i, j int) bool {
		a, b := cs[i], cs[j]
		if a.free != b.free {
			return a.free > b.free
		}
		if a.near != b.near {
			return a.near > b.near
		}
		if a.held != b.held {
			return a.held > b.held
		}
		return a.ID < b.ID
	})
	if len(cs) > s.o.MaxParents {
		cs = cs[:s.o.MaxParents]
	}
	out := make([]Peer, len(cs))
	for i, c := range cs {
		out[i] = c.Peer
	}
	return out
}

// Enqueue asks one live seed peer (rendezvous of the task ID over the
// seeds) to download a task; it reports false when there is no seed.
func (s *Scheduler) Enqueue(w Work) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	best, bestScore := "", uint64(0)
	for id, p := range s.peers {
		if !p.Seed || !s.alive(id) {
			continue
		}
		if sc := score(w.TaskID, id); best == "" || sc > bestScore {
			best, bestScore = id, sc
		}
	}
	if best == "" {
		return "", false
	}
	s.work[best] = append(s.work[best], w)
	s.task(w.TaskID, 0, 0).members[best] = true
	return best, true
}

// TakeWork hands a seed peer the downloads queued for it.
func (s *Scheduler) TakeWork(seedID string) []Work {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.work[seedID]
	delete(s.work, seedID)
	return w
}

// Holders counts the live peers holding every piece of a task (for preheat progress).
func (s *Scheduler) Holders(taskID string) (complete, pieces int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[taskID]
	if !ok || t.length == 0 {
		return 0, 0
	}
	n := int((t.length + t.pieceSize - 1) / t.pieceSize)
	counts := map[string]int{}
	for i := 0; i < n; i++ {
		if p, ok := t.pieces[i]; ok {
			for id := range p.holders {
				counts[id]++
			}
		}
	}
	for _, c := range counts {
		if c == n {
			complete++
		}
	}
	return complete, n
}
