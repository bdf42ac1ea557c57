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

	"github.com/starling-dev/starling/pkg/piece"
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
	// Wait: another peer is fetching it from the origin, or every holder
	// is busy; ask again shortly.
	Wait bool
}

// Options tunes a Scheduler.
type Options struct {
	// PeerTTL: a peer not heard from for this long is gone.
	PeerTTL time.Duration
	// FetchTTL: an origin fetch not reported done within this long is
	// given to another peer.
	FetchTTL time.Duration
	// SeedStartTTL bounds a claim handed to a seed that has not started
	// the task yet (not registered or scheduled it): a seed that cannot
	// fetch it (origin unreachable from there, work lost) holds the others
	// back this long, not FetchTTL.
	SeedStartTTL time.Duration
	// MaxParents is how many parents are returned per piece.
	MaxParents int
	// MaxOriginFetchers bounds the peers other than seeds that hold origin
	// claims on one whole-blob task at once (0: 2). Every peer of a
	// cluster that starts a blob at once would otherwise claim the first
	// pieces it asks for, and the origin link would carry dozens of
	// streams while the pieces everyone waits for crawl in; the others
	// wait for the pieces to appear from these few, or from the seed.
	MaxOriginFetchers int
	// StartGrace: for this long after the scheduler starts (0: 3 s;
	// negative: none), no piece of a whole-blob task (registered with a
	// URL) is handed out for an origin fetch. After a restart the
	// scheduler knows nothing, and the peers that hold a piece may not
	// have re-announced it yet: they do on their first heartbeat that gets
	// through (the peers' reconnect backoff is at most 2 s, their
	// heartbeat 1 s); the peers that were fetching re-register their
	// tasks when their next schedule fails. A scheduler that was not
	// restarted is rarely asked for anything this early. Lazy tasks (no
	// URL) are not held back: their reads must not wait.
	StartGrace time.Duration
	// MaxPeers and MaxTasks bound the peers and tasks known at once (0:
	// DefaultMaxPeers, DefaultMaxTasks); see limits.go.
	MaxPeers, MaxTasks int
	Now                func() time.Time
}

// Work asks a seed peer to download a task.
type Work struct {
	TaskID string
	URL    string
	Header map[string][]string
	Digest string
}

// HeldTask is what a peer holds of one task, as listed in a full announce.
type HeldTask struct {
	TaskID    string
	Length    int64
	PieceSize int64
	// Pieces maps piece numbers to their lowercase hex sha256.
	Pieces map[int]string
	// Ranges are byte ranges held outside whole pieces (lazy reads).
	Ranges []Range
}

// TaskStatus is how far a task has spread among the live peers.
type TaskStatus struct {
	TaskID    string `json:"task_id"`
	Length    int64  `json:"length"`
	PieceSize int64  `json:"piece_size"`
	Pieces    int    `json:"pieces"`
	// Complete counts live peers holding every piece; SeedsComplete the seeds among them.
	Complete      int `json:"complete"`
	SeedsComplete int `json:"seeds_complete"`
	// Fetched counts the pieces at least one live peer holds.
	Fetched int `json:"fetched"`
}

// offerTTL is how long offering a parent counts against its free upload
// slots unless the requester reports the piece sooner: about the time a
// piece takes between peers and the default announce interval, after
// which the parent's reported Load includes the upload (or it is over).
const offerTTL = time.Second

type peerState struct {
	Peer
	lastSeen time.Time
	// offers are the uploads handed to this parent (requester, task and
	// piece -> when the offer lapses) that its last reported Load may not
	// include yet. Without them every requester between two announces sees
	// the same free slots, and a parent that alone holds a new piece is
	// offered to more peers than it serves. An offer ends when the
	// requester reports the piece, so a fast parent is not held to one
	// slot per second.
	offers map[offerKey]time.Time
	// pruneAt is no later than the first offer lapses: the offers are
	// walked only then, not on every rank of every piece.
	pruneAt time.Time
}

type pieceState struct {
	digest  string
	holders map[string]bool
	// fetcher holds the piece's origin fetch until deadline; it may be a
	// seed the fetch was handed to rather than the peer that asked.
	fetcher  string
	deadline time.Time
	// lapsed are peers whose claim on this piece ran out while they were
	// alive (stuck): the piece is not handed to them again.
	lapsed map[string]bool
	n      int
	// offeredBy is the parent each requester was last offered for it.
	offeredBy map[string]string
}

type taskState struct {
	id        string
	length    int64
	pieceSize int64
	// work is how to fetch the task, as last registered: the latest
	// headers, because authorization tokens expire.
	work    Work
	pieces  map[int]*pieceState
	held    map[string]int             // peer -> pieces it holds
	bad     map[string]map[string]bool // requester -> parents it refuses
	members map[string]bool            // peers downloading or holding the task
	// seedWork are the seeds asked to download the whole task: only they
	// are handed origin fetches for others, since a seed that merely read
	// a few pieces would leave the others waiting for nothing.
	seedWork map[string]bool
	// seedStarted are the seeds that registered or scheduled the task themselves.
	seedStarted map[string]bool
	// rng is the byte-range state of lazy readers (ranges.go).
	rng rangeState
	// detached: made while the scheduler was at MaxTasks, so not kept.
	detached bool
}

// Scheduler is the in-memory state. It is safe for concurrent use.
type Scheduler struct {
	o     Options
	mu    sync.Mutex
	peers map[string]*peerState
	tasks map[string]*taskState
	// seeds indexes the seed peers of peers: queueing work picks among
	// them, and must not walk every peer.
	seeds map[string]*peerState
	// peerTasks indexes the tasks each peer ID takes part in (joinLocked),
	// so that dropping a peer or replacing its holdings does not walk every
	// task. A task is listed once, when the peer becomes a member, and a
	// peer leaves its tasks all at once (forgetLocked). A slice, not a
	// set: most peers take part in few tasks, and a set of one costs
	// ten times as much.
	peerTasks map[string][]string
	// work queues tasks for seed peers to fetch (preheat, seed-triggered downloads).
	work map[string]*workQueue
	// graceEnd is when StartGrace ends.
	graceEnd time.Time
}

// New returns an empty Scheduler.
func New(o Options) *Scheduler {
	if o.PeerTTL <= 0 {
		o.PeerTTL = 30 * time.Second
	}
	if o.FetchTTL <= 0 {
		o.FetchTTL = 30 * time.Second
	}
	if o.SeedStartTTL <= 0 {
		o.SeedStartTTL = 10 * time.Second
	}
	if o.MaxParents <= 0 {
		o.MaxParents = 4
	}
	if o.MaxOriginFetchers <= 0 {
		o.MaxOriginFetchers = 2
	}
	if o.StartGrace == 0 {
		o.StartGrace = 3 * time.Second
	}
	if o.MaxPeers <= 0 {
		o.MaxPeers = DefaultMaxPeers
	}
	if o.MaxTasks <= 0 {
		o.MaxTasks = DefaultMaxTasks
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Scheduler{o: o, peers: map[string]*peerState{}, tasks: map[string]*taskState{}, work: map[string]*workQueue{},
		seeds: map[string]*peerState{}, peerTasks: map[string][]string{},
		graceEnd: o.Now().Add(max(o.StartGrace, 0))}
}

// Announce records or refreshes a peer (it is also the heartbeat). known
// is false when the scheduler had no record of the peer (it restarted, or
// purged the peer): the peer should then announce its holdings in full.
func (s *Scheduler) Announce(p Peer) (known bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.announceLocked(p)
}

func (s *Scheduler) announceLocked(p Peer) bool {
	old, known := s.peers[p.ID]
	ps := &peerState{Peer: p, lastSeen: s.o.Now()}
	if known {
		// Recent offers stay counted: the requests may not have reached
		// the parent when it measured its load.
		ps.offers, ps.pruneAt = old.offers, old.pruneAt
	}
	s.peers[p.ID] = ps
	if p.Seed {
		s.seeds[p.ID] = ps
	} else {
		delete(s.seeds, p.ID)
	}
	return known
}

// AnnounceFull is Announce with everything the peer holds: its holdings
// are replaced by held. Claims on origin fetches stay, since a full
// announce also follows a failed report while the peer keeps fetching.
func (s *Scheduler) AnnounceFull(p Peer, held []HeldTask) (known bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	known = s.announceLocked(p)
	for _, tid := range s.peerTasks[p.ID] {
		t := s.tasks[tid]
		if t == nil {
			continue
		}
		t.rng.dropHeld(p.ID)
		if t.held[p.ID] == 0 {
			continue
		}
		for _, ps := range t.pieces {
			delete(ps.holders, p.ID)
		}
		delete(t.held, p.ID)
	}
	for _, h := range held {
		if _, ok := s.tasks[h.TaskID]; !ok && len(s.tasks) >= s.o.MaxTasks {
			continue
		}
		if len(s.peerTasks[p.ID]) >= maxTasksPerPeer {
			if t := s.tasks[h.TaskID]; t == nil || !t.members[p.ID] {
				continue
			}
		}
		t := s.task(h.TaskID, h.Length, h.PieceSize)
		if !t.sizeMatches(h.Length, h.PieceSize) {
			continue
		}
		s.joinLocked(t, p.ID)
		for n, d := range h.Pieces {
			t.addHolder(n, p.ID, d)
		}
		for _, r := range h.Ranges {
			t.rng.hold(p.ID, r, t.length)
		}
	}
	return known
}

// Leave forgets a peer and everything it held. Tasks a seed was asked to
// fetch move to another seed.
func (s *Scheduler) Leave(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked(id)
}

// GC purges the peers not heard from for PeerTTL (Schedule already ignores
// them) and the tasks nobody takes part in any more. Tasks a purged seed
// was asked to fetch move to another seed.
func (s *Scheduler) GC() (peers, tasks int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.o.Now()
	for id, p := range s.peers {
		if now.Sub(p.lastSeen) > s.o.PeerTTL {
			s.dropLocked(id)
			peers++
		}
	}
	// Also sweeps peers that reported or asked but never announced.
	for pid := range s.peerTasks {
		if s.peers[pid] == nil {
			s.forgetLocked(pid)
		}
	}
	for id, t := range s.tasks {
		if len(t.members) == 0 && len(t.held) == 0 {
			delete(s.tasks, id)
			tasks++
		}
	}
	return peers, tasks
}

// dropLocked forgets a peer. A seed's tasks, queued or started, go to
// another live seed unless one already works on them or holds them, so a
// preheat survives the death of its seed.
func (s *Scheduler) dropLocked(id string) {
	queued := map[string]Work{}
	if q := s.work[id]; q != nil {
		for _, w := range q.list {
			queued[w.TaskID] = w
		}
	}
	delete(s.peers, id)
	delete(s.seeds, id)
	delete(s.work, id)
	for _, t := range s.forgetLocked(id) {
		tid := t.id
		w, ok := queued[tid]
		if !ok {
			w = t.work
			w.TaskID = tid
		}
		if w.URL != "" && !s.seedOnLocked(t) {
			s.enqueueLocked(w)
		}
	}
}

// joinLocked records that peer id takes part in task t: everything that
// names a peer in a task's state goes with it, and forgetLocked undoes it.
func (s *Scheduler) joinLocked(t *taskState, id string) {
	if t.members[id] {
		return
	}
	t.members[id] = true
	if !t.detached {
		s.peerTasks[id] = append(s.peerTasks[id], t.id)
	}
}

// forgetLocked removes a peer from every task it takes part in; it returns
// the tasks the peer was asked to fetch as a seed.
func (s *Scheduler) forgetLocked(id string) (seedTasks []*taskState) {
	for _, tid := range s.peerTasks[id] {
		t := s.tasks[tid]
		if t == nil {
			continue
		}
		if t.seedWork[id] {
			seedTasks = append(seedTasks, t)
		}
		t.forget(id)
	}
	delete(s.peerTasks, id)
	return seedTasks
}

// forget removes a peer from a task.
func (t *taskState) forget(id string) {
	delete(t.members, id)
	delete(t.held, id)
	delete(t.bad, id)
	delete(t.seedWork, id)
	delete(t.seedStarted, id)
	t.rng.forget(id)
	for _, p := range t.pieces {
		delete(p.holders, id)
		delete(p.lapsed, id)
		if p.fetcher == id {
			p.fetcher = ""
		}
	}
}

func (s *Scheduler) alive(id string) bool {
	p, ok := s.peers[id]
	return ok && s.o.Now().Sub(p.lastSeen) <= s.o.PeerTTL
}

// stale reports a known peer that stopped heartbeating. A peer the
// scheduler does not know yet (it asked before its first announce after a
// restart) is not stale: its claims run until their deadline.
func (s *Scheduler) stale(id string) bool {
	p, ok := s.peers[id]
	return ok && s.o.Now().Sub(p.lastSeen) > s.o.PeerTTL
}

// task returns the state of a task, made if new. At MaxTasks a new task's
// state is not kept (the server refuses such requests first: AdmitTask).
// The first size that is within bounds fixes the task's.
func (s *Scheduler) task(id string, length, pieceSize int64) *taskState {
	t, ok := s.tasks[id]
	if !ok {
		// The maps most tasks never fill are made when first written
		// (setTrue, setFlag): a task costs little until it is used.
		t = &taskState{id: id, pieces: map[int]*pieceState{}, held: map[string]int{}, members: map[string]bool{}}
		if len(s.tasks) < s.o.MaxTasks {
			s.tasks[id] = t
		} else {
			t.detached = true
		}
	}
	if t.length == 0 && sizeOK(length, pieceSize) {
		t.length, t.pieceSize = length, pieceSize
	}
	return t
}

// setTrue sets m[k], making m if nil.
func setTrue(m map[string]bool, k string) map[string]bool {
	if m == nil {
		m = map[string]bool{}
	}
	m[k] = true
	return m
}

// setFlag sets m[k][v], making m[k] if nil.
func setFlag(m map[string]map[string]bool, k, v string) {
	m[k] = setTrue(m[k], v)
}

// sizeOK accepts a task size the scheduler may keep state for. The server
// holds peers to piece.Check; the state itself only needs the piece count
// bounded, so that nothing it walks or keeps per piece is unbounded.
func sizeOK(length, pieceSize int64) bool {
	return length > 0 && pieceSize > 0 && length <= piece.MaxLength && piece.Count(length, pieceSize) <= piece.MaxCount
}

// sizeMatches reports whether a peer that cut the task into length and
// pieceSize holds the same pieces as everyone else (0 is unknown).
func (t *taskState) sizeMatches(length, pieceSize int64) bool {
	if t.length == 0 || length == 0 {
		return true
	}
	return t.length == length && t.pieceSize == pieceSize
}

func (t *taskState) count() int {
	if t.pieceSize <= 0 {
		return 0
	}
	return piece.Count(t.length, t.pieceSize)
}

// piece returns the state of piece n, made if new; nil for a piece outside
// the task, or past maxUnsizedPieces of a task of unknown size.
func (t *taskState) piece(n int) *pieceState {
	p, ok := t.pieces[n]
	if !ok {
		if n < 0 || n >= piece.MaxCount || (t.length > 0 && n >= t.count()) ||
			(t.length == 0 && len(t.pieces) >= maxUnsizedPieces) {
			return nil
		}
		p = &pieceState{holders: map[string]bool{}, n: n}
		t.pieces[n] = p
	}
	return p
}

// addHolder records that id holds piece n. The first digest reported for a
// piece is the one every receiver checks; a peer holding other bytes is
// not a holder.
func (t *taskState) addHolder(n int, id, digest string) {
	// Holders are kept only of a sized task: its piece count bounds them.
	if digest == "" || n < 0 || t.length == 0 || n >= t.count() {
		return
	}
	p := t.piece(n)
	if p == nil {
		return
	}
	if p.digest == "" {
		p.digest = digest
	} else if p.digest != digest {
		return
	}
	if !p.holders[id] {
		p.holders[id] = true
		t.held[id]++
		if t.seedWork[id] && t.length > 0 && t.held[id] >= t.count() {
			// Done: nothing left to hand over should this seed die.
			delete(t.seedWork, id)
		}
	}
	if p.fetcher == id {
		p.fetcher = ""
	}
}

// ReportPiece records that peer holds piece n of a task, with its digest.
func (s *Scheduler) ReportPiece(peerID, taskID string, n int, digest string, length, pieceSize int64) {
	s.ReportPieces(peerID, taskID, length, pieceSize, map[int]string{n: digest})
}

// ReportPieces records that peer holds pieces of a task (number -> digest).
// A peer that cut the task differently from the first registration holds
// different pieces and is ignored.
func (s *Scheduler) ReportPieces(peerID, taskID string, length, pieceSize int64, pieces map[int]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.task(taskID, length, pieceSize)
	if !t.sizeMatches(length, pieceSize) {
		return
	}
	s.joinLocked(t, peerID)
	for n, d := range pieces {
		t.addHolder(n, peerID, d)
		// The upload that brought the piece is over.
		if p, ok := t.pieces[n]; ok {
			if parent, ok := p.offeredBy[peerID]; ok {
				delete(p.offeredBy, peerID)
				if ps := s.peers[parent]; ps != nil {
					delete(ps.offers, offerKey{requester: peerID, task: taskID, piece: n})
				}
			}
		}
	}
}

type offerKey struct {
	requester, task string
	piece           int
}

// ReportBadParent stops offering parent to peer for this task.
func (s *Scheduler) ReportBadParent(peerID, taskID, parent string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[taskID]
	if !ok {
		// Nothing is offered for a task the scheduler does not know.
		return
	}
	if len(t.bad[peerID]) < maxBadParents {
		s.joinLocked(t, peerID)
		if t.bad == nil {
			t.bad = map[string]map[string]bool{}
		}
		setFlag(t.bad, peerID, parent)
	}
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

// RegisterTask records that a peer starts a task and how to fetch it. The
// first registration with a size fixes the task's length and piece size,
// which are returned. When a plain peer starts a task no live seed works
// on, the task is queued for a seed (returned), so the seed fetches it
// from the origin and the plain peers wait for its pieces.
func (s *Scheduler) RegisterTask(peerID string, w Work, length, pieceSize int64) (l, ps int64, seed string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.task(w.TaskID, length, pieceSize)
	s.joinLocked(t, peerID)
	if w.URL != "" {
		t.work = w
	}
	l, ps = t.length, t.pieceSize
	r := s.peers[peerID]
	if r != nil && r.Seed {
		t.seedStarted = setTrue(t.seedStarted, peerID)
		return l, ps, ""
	}
	if w.URL == "" || s.seedOnLocked(t) {
		return l, ps, ""
	}
	seed, _ = s.enqueueLocked(w)
	return l, ps, seed
}

// seedOnLocked reports whether a live seed was asked to fetch the task or
// already holds all of it.
func (s *Scheduler) seedOnLocked(t *taskState) bool {
	for id := range t.seedWork {
		if p := s.peers[id]; p != nil && p.Seed && s.alive(id) {
			return true
		}
	}
	if n := t.count(); n > 0 {
		// Whichever is smaller: the seeds, or the task's holders.
		if len(s.seeds) <= len(t.held) {
			for id := range s.seeds {
				if t.held[id] >= n && s.alive(id) {
					return true
				}
			}
			return false
		}
		for id, h := range t.held {
			if p := s.seeds[id]; p != nil && h >= n && s.alive(id) {
				return true
			}
		}
	}
	return false
}

// Schedule answers a peer that lacks pieces of a task.
func (s *Scheduler) Schedule(peerID, taskID string, pieces []int) []Assignment {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.o.Now()
	t := s.task(taskID, 0, 0)
	s.joinLocked(t, peerID)
	req := s.peers[peerID]
	if req != nil && req.Seed {
		t.seedStarted = setTrue(t.seedStarted, peerID)
	}
	out := make([]Assignment, 0, len(pieces))
	fs := fetchers{s: s, t: t, now: now}
	for _, n := range pieces {
		p := t.piece(n)
		if p == nil {
			// Outside the task, or too many pieces of a task of unknown
			// size: ask again once it is sized.
			out = append(out, Assignment{Piece: n, Wait: true})
			continue
		}
		a := Assignment{Piece: n, Digest: p.digest}
		var busy bool
		a.Parents, busy = s.rank(t, p, peerID, req)
		switch {
		case len(a.Parents) > 0:
		case busy:
			// Holders exist but are full now: another origin fetch
			// would cost the origin what a short wait does not.
			a.Wait = true
		default:
			a.BackToSource = s.claim(t, p, peerID, now, &fs)
			a.Wait = !a.BackToSource
		}
		out = append(out, a)
	}
	return out
}

// claim decides who fetches a piece nobody holds from the origin: the
// peer holding a running claim, else a seed working on the task, else the
// requester, if it is one of the few peers allowed to fetch the task from
// the origin at once (fs) and the scheduler is not in its start grace. It
// reports whether the requester is the one. At most one peer holds a
// claim, and a claim ends when its holder reports the piece, dies, leaves
// or lets FetchTTL pass.
func (s *Scheduler) claim(t *taskState, p *pieceState, requester string, now time.Time, fs *fetchers) bool {
	if p.fetcher != "" {
		running := now.Before(p.deadline) && !s.stale(p.fetcher)
		switch {
		case running && p.fetcher == requester:
			// Asking again is fetching again (a retry, or the seed
			// starting a fetch it was handed): the clock restarts.
			p.deadline = now.Add(s.o.FetchTTL)
			return true
		case running:
			return false
		case !s.stale(p.fetcher):
			if p.lapsed == nil {
				p.lapsed = map[string]bool{}
			}
			p.lapsed[p.fetcher] = true
		}
		p.fetcher = ""
	}
	if now.Before(s.graceEnd) {
		// Just (re)started: whoever holds the piece may not have said so
		// yet. Also for a task this scheduler has no registration of: a
		// peer that did not notice the restart asks for it without
		// registering it again. (Lazy reads do not claim pieces: their
		// ranges are claimed in ranges.go, without a grace.)
		return false
	}
	who := s.seedFor(t, p, requester)
	if who == requester && !s.isSeed(requester) && !fs.room(requester) {
		return false
	}
	p.fetcher, p.deadline = who, now.Add(s.o.FetchTTL)
	if p.fetcher != requester && !t.seedStarted[p.fetcher] {
		p.deadline = now.Add(min(s.o.FetchTTL, s.o.SeedStartTTL))
	}
	if p.fetcher == requester {
		fs.add(requester)
	}
	return p.fetcher == requester
}

func (s *Scheduler) isSeed(id string) bool {
	p, ok := s.peers[id]
	return ok && p.Seed
}

// fetchers are the peers other than seeds holding running origin claims on
// one task, counted once per Schedule call and only when needed.
type fetchers struct {
	s   *Scheduler
	t   *taskState
	now time.Time
	set map[string]bool
}

// room reports whether id may take an origin claim on the task: it already
// holds one, or fewer than MaxOriginFetchers peers do. Tasks registered
// without a URL (lazy reads, whose demand reads must not queue behind
// other nodes) and tasks known only from schedules are not limited.
func (f *fetchers) room(id string) bool {
	if f.t.work.URL == "" {
		return true
	}
	if f.set == nil {
		f.set = map[string]bool{}
		for _, p := range f.t.pieces {
			if p.fetcher != "" && f.now.Before(p.deadline) && !f.s.stale(p.fetcher) && !f.s.isSeed(p.fetcher) {
				f.set[p.fetcher] = true
			}
		}
	}
	return f.set[id] || len(f.set) < f.s.o.MaxOriginFetchers
}

func (f *fetchers) add(id string) {
	if f.set != nil {
		f.set[id] = true
	}
}

// seedFor returns who fetches a piece from the origin: the requester when
// it is a seed, else a live seed asked to fetch the whole task (that has
// not let this piece lapse), else the requester.
func (s *Scheduler) seedFor(t *taskState, p *pieceState, requester string) string {
	if r, ok := s.peers[requester]; ok && r.Seed {
		return requester
	}
	var ids []string
	for id := range t.seedWork {
		if ps, ok := s.peers[id]; ok && ps.Seed && s.alive(id) && !p.lapsed[id] {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return requester
	}
	sort.Strings(ids)
	return ids[0]
}

// rank lists the live holders of a piece the requester has not refused,
// best first: most free upload slots (counting recent offers), then
// nearest (same rack, same zone), then holding most of the task. busy
// reports holders that exist but have no free slot now.
func (s *Scheduler) rank(t *taskState, p *pieceState, requester string, req *peerState) (_ []Peer, busy bool) {
	type cand struct {
		Peer
		free, near, held int
	}
	now := s.o.Now()
	var cs []cand
	seen := 0
	for id := range p.holders {
		if seen++; seen > maxRankCandidates {
			break
		}
		if id == requester || t.bad[requester][id] || !s.alive(id) {
			continue
		}
		ps := s.peers[id]
		ps.pruneOffers(now)
		// Load and offers are two estimates of the same running uploads.
		c := cand{Peer: ps.Peer, free: ps.Capacity - max(ps.Load, len(ps.offers)), held: t.held[id]}
		if c.free <= 0 {
			// Capacity 0 is a peer that serves nobody, not a busy one.
			busy = busy || ps.Capacity > 0
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
	if len(cs) > 0 {
		// The requester starts with one parent; charge the likeliest.
		ps := s.peers[cs[0].ID]
		if ps.offers == nil {
			ps.offers = map[offerKey]time.Time{}
		}
		k := offerKey{requester: requester, task: t.id, piece: p.n}
		until := now.Add(offerTTL)
		if len(ps.offers) == 0 || until.Before(ps.pruneAt) {
			ps.pruneAt = until
		}
		ps.offers[k] = until
		if _, ok := p.offeredBy[requester]; ok || len(p.offeredBy) < maxOffersPerPiece {
			if p.offeredBy == nil {
				p.offeredBy = map[string]string{}
			}
			p.offeredBy[requester] = cs[0].ID
		}
	}
	out := make([]Peer, len(cs))
	for i, c := range cs {
		out[i] = c.Peer
	}
	return out, busy
}

// pruneOffers drops the offers that lapsed.
func (ps *peerState) pruneOffers(now time.Time) {
	if len(ps.offers) == 0 || !now.After(ps.pruneAt) {
		return
	}
	var next time.Time
	for k, until := range ps.offers {
		if now.After(until) {
			delete(ps.offers, k)
		} else if next.IsZero() || until.Before(next) {
			next = until
		}
	}
	ps.pruneAt = next
}

// Enqueue asks one live seed peer (rendezvous of the task ID over the
// seeds) to download a task; it reports false when there is no seed.
func (s *Scheduler) Enqueue(w Work) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.enqueueLocked(w)
}

func (s *Scheduler) enqueueLocked(w Work) (string, bool) {
	t := s.task(w.TaskID, 0, 0)
	if w.URL != "" {
		t.work = w
	}
	best, bestScore := "", uint64(0)
	for id := range s.seeds {
		if !s.alive(id) {
			continue
		}
		if sc := score(w.TaskID, id); best == "" || sc > bestScore {
			best, bestScore = id, sc
		}
	}
	if best == "" {
		return "", false
	}
	s.joinLocked(t, best)
	t.seedWork = setTrue(t.seedWork, best)
	q := s.work[best]
	if q == nil {
		q = &workQueue{at: map[string]int{}}
		s.work[best] = q
	}
	q.put(w)
	return best, true
}

// workQueue is a seed's queued work, in order, indexed by task: a task
// queued again replaces its entry (fresher headers) without a walk.
type workQueue struct {
	list []Work
	at   map[string]int
}

func (q *workQueue) put(w Work) {
	if i, ok := q.at[w.TaskID]; ok {
		q.list[i] = w
		return
	}
	q.at[w.TaskID] = len(q.list)
	q.list = append(q.list, w)
}

// TakeWork hands a seed peer the downloads queued for it.
func (s *Scheduler) TakeWork(seedID string) []Work {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.work[seedID]
	delete(s.work, seedID)
	if q == nil {
		return nil
	}
	return q.list
}

// TaskStatus reports how far a task has spread among the live peers; ok
// is false for a task the scheduler does not know.
func (s *Scheduler) TaskStatus(taskID string) (TaskStatus, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := TaskStatus{TaskID: taskID}
	t, ok := s.tasks[taskID]
	if !ok {
		return st, false
	}
	st.Length, st.PieceSize, st.Pieces = t.length, t.pieceSize, t.count()
	if st.Pieces == 0 {
		return st, true
	}
	// Walk what is stored, never 0..Pieces: the piece count is what a
	// client said (finding 3 of issue 11).
	for n, p := range t.pieces {
		if n >= st.Pieces {
			continue
		}
		for id := range p.holders {
			if s.alive(id) {
				st.Fetched++
				break
			}
		}
	}
	// held counts each peer's pieces as they are added (addHolder).
	for id, h := range t.held {
		if h >= st.Pieces && s.alive(id) {
			st.Complete++
			if s.peers[id].Seed {
				st.SeedsComplete++
			}
		}
	}
	return st, true
}

// Holders counts the live peers holding every piece of a task (for preheat progress).
func (s *Scheduler) Holders(taskID string) (complete, pieces int) {
	st, _ := s.TaskStatus(taskID)
	return st.Complete, st.Pieces
}

// Stats counts the live peers, the live seeds among them, and the tasks known.
func (s *Scheduler) Stats() (peers, seeds, tasks int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, p := range s.peers {
		if s.alive(id) {
			peers++
			if p.Seed {
				seeds++
			}
		}
	}
	return peers, seeds, len(s.tasks)
}
