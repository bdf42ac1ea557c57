package scheduler

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/allow"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/piece"
)

// ServerOptions configures a Server.
type ServerOptions struct {
	// Registry gets the scheduler's metrics and is what /metrics serves;
	// nil: a new registry.
	Registry *prometheus.Registry
	// Logger: nil is slog.Default().
	Logger *slog.Logger
	// PreheatAllowed are the host patterns (allow.New) of the URLs that
	// POST /api/v1/preheat accepts; empty admits any host on ports 80 and
	// 443 but never an internal address or name.
	PreheatAllowed []string
}

// Server serves a Scheduler over gRPC (the peers) and HTTP (preheat, task
// status, metrics, health).
type Server struct {
	schedulerpb.UnimplementedSchedulerServer

	s   *Scheduler
	log *slog.Logger
	reg *prometheus.Registry

	schedules    prometheus.Counter
	backToSource prometheus.Counter
	preheats     *prometheus.CounterVec
	preheatAllow *allow.List
}

// NewServer returns a Server over s and registers its metrics.
func NewServer(s *Scheduler, o ServerOptions) (*Server, error) {
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	srv := &Server{s: s, log: o.Logger, reg: o.Registry,
		schedules: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "starling_scheduler_schedule_requests_total",
			Help: "Schedule calls answered.",
		}),
		backToSource: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "starling_scheduler_back_to_source_total",
			Help: "Pieces a peer was told to fetch from the origin.",
		}),
		preheats: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "starling_scheduler_preheat_tasks_total",
			Help: "Tasks asked to be preheated, by result (queued for a seed, or no_seed).",
		}, []string{"result"}),
	}
	cs := []prometheus.Collector{srv.schedules, srv.backToSource, srv.preheats}
	for _, role := range []string{"peer", "seed"} {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "starling_scheduler_peers",
			Help:        "Live peers (heard from within peer_ttl), by role.",
			ConstLabels: prometheus.Labels{"role": role},
		}, func() float64 {
			peers, seeds, _ := s.Stats()
			if role == "seed" {
				return float64(seeds)
			}
			return float64(peers - seeds)
		}))
	}
	cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "starling_scheduler_tasks",
		Help: "Tasks the scheduler keeps state for.",
	}, func() float64 {
		_, _, tasks := s.Stats()
		return float64(tasks)
	}))
	for _, c := range cs {
		if err := o.Registry.Register(c); err != nil {
			return nil, fmt.Errorf("register scheduler metrics: %w", err)
		}
	}
	srv.preheats.WithLabelValues("queued")
	srv.preheats.WithLabelValues("no_seed")
	var err error
	if srv.preheatAllow, err = newPreheatAllow(o.PreheatAllowed); err != nil {
		return nil, err
	}
	return srv, nil
}

// Scheduler returns the state the server answers from.
func (srv *Server) Scheduler() *Scheduler { return srv.s }

// RegisterGRPC adds the scheduler service to g.
func (srv *Server) RegisterGRPC(g *grpc.Server) { schedulerpb.RegisterSchedulerServer(g, srv) }

// RunGC purges dead peers and abandoned tasks every interval until ctx ends.
func (srv *Server) RunGC(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if peers, tasks := srv.s.GC(); peers+tasks > 0 {
				srv.log.Info("purged", "peers", peers, "tasks", tasks)
			}
		}
	}
}

func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

// limited is a request refused because the scheduler is at a limit (ErrLimit).
func limited(format string, args ...any) error {
	return status.Errorf(codes.ResourceExhausted, format, args...)
}

// checkPieceDigest accepts what peers send: a lowercase hex sha256.
func checkPieceDigest(d string) error {
	if len(d) != 64 || strings.ToLower(d) != d {
		return fmt.Errorf("digest %q is not a lowercase hex sha256", d)
	}
	if _, err := hex.DecodeString(d); err != nil {
		return fmt.Errorf("digest %q is not a lowercase hex sha256", d)
	}
	return nil
}

// checkBlobDigest accepts "" or an OCI digest ("sha256:<hex>", "sha512:<hex>").
func checkBlobDigest(d string) error {
	if d == "" {
		return nil
	}
	algo, h, _ := strings.Cut(d, ":")
	n := map[string]int{"sha256": 64, "sha512": 128}[algo]
	if n == 0 || len(h) != n || strings.ToLower(h) != h {
		return fmt.Errorf("digest %q is not sha256:<hex> or sha512:<hex>", d)
	}
	if _, err := hex.DecodeString(h); err != nil {
		return fmt.Errorf("digest %q is not sha256:<hex> or sha512:<hex>", d)
	}
	return nil
}

// checkSize accepts an unknown size (0, 0) or a length with a piece size
// within the limits of package piece.
func checkSize(length, pieceSize int64) error {
	if length < 0 || pieceSize < 0 {
		return fmt.Errorf("negative length %d or piece size %d", length, pieceSize)
	}
	if length > 0 && pieceSize == 0 {
		return fmt.Errorf("length %d without a piece size", length)
	}
	if pieceSize > 0 {
		return piece.Check(length, pieceSize)
	}
	return nil
}

// checkPieces validates piece numbers against a task's size (count 0:
// unknown, and then at most piece.MaxCount).
func checkPieces(count int, nums []int32) error {
	for _, n := range nums {
		if n < 0 || (count > 0 && int(n) >= count) || int(n) >= piece.MaxCount {
			return fmt.Errorf("piece %d out of range (task has %d pieces)", n, count)
		}
	}
	return nil
}

func peerOf(pi *schedulerpb.PeerInfo) (Peer, error) {
	if pi == nil || pi.GetId() == "" {
		return Peer{}, errors.New("peer id missing")
	}
	p := Peer{ID: pi.GetId(), IP: pi.GetIp(), UploadPort: int(pi.GetUploadPort()), Capacity: int(pi.GetCapacity()),
		Load: int(pi.GetLoad()), Zone: pi.GetZone(), Rack: pi.GetRack(), Seed: pi.GetSeed()}
	if p.UploadPort < 0 || p.UploadPort > 65535 || p.Capacity < 0 || p.Load < 0 {
		return p, fmt.Errorf("peer %s: bad upload port %d, capacity %d or load %d", p.ID, p.UploadPort, p.Capacity, p.Load)
	}
	if p.IP != "" && net.ParseIP(p.IP) == nil {
		return p, fmt.Errorf("peer %s: ip %q is not an IP address", p.ID, p.IP)
	}
	// A peer that serves others must say where, or it would be offered as
	// a parent nobody can reach.
	if p.Capacity > 0 && (p.IP == "" || p.UploadPort == 0) {
		return p, fmt.Errorf("peer %s: capacity %d without an ip and upload port", p.ID, p.Capacity)
	}
	return p, nil
}

func infoOf(p Peer) *schedulerpb.PeerInfo {
	return &schedulerpb.PeerInfo{Id: p.ID, Ip: p.IP, UploadPort: int32(p.UploadPort), Capacity: int32(p.Capacity),
		Load: int32(p.Load), Zone: p.Zone, Rack: p.Rack, Seed: p.Seed}
}

func workOf(w *schedulerpb.Work) (Work, error) {
	if w == nil || w.GetTaskId() == "" {
		return Work{}, errors.New("task id missing")
	}
	out := Work{TaskID: w.GetTaskId(), URL: w.GetUrl(), Digest: w.GetDigest()}
	if err := checkBlobDigest(out.Digest); err != nil {
		return out, fmt.Errorf("task %s: %w", out.TaskID, err)
	}
	// Only the headers a seed may send: no credential travels through the
	// scheduler, whoever registers or preheats (the seed uses its own).
	for k, v := range w.GetHeader() {
		for _, allowed := range preheatHeaders {
			if http.CanonicalHeaderKey(k) == allowed && len(v.GetValues()) > 0 {
				if out.Header == nil {
					out.Header = map[string][]string{}
				}
				out.Header[allowed] = append([]string(nil), v.GetValues()...)
			}
		}
	}
	return out, nil
}

func workPB(w Work) *schedulerpb.Work {
	out := &schedulerpb.Work{TaskId: w.TaskID, Url: w.URL, Digest: w.Digest}
	if len(w.Header) > 0 {
		out.Header = make(map[string]*schedulerpb.HeaderValues, len(w.Header))
		for k, v := range w.Header {
			out.Header[k] = &schedulerpb.HeaderValues{Values: append([]string(nil), v...)}
		}
	}
	return out
}

// heldOf converts a held task of a full announce, checking it.
func heldOf(h *schedulerpb.HeldTask) (HeldTask, error) {
	out := HeldTask{TaskID: h.GetTaskId(), Length: h.GetLength(), PieceSize: h.GetPieceSize(), Pieces: map[int]string{}}
	if out.TaskID == "" {
		return out, errors.New("held task: task id missing")
	}
	if err := checkSize(out.Length, out.PieceSize); err != nil {
		return out, fmt.Errorf("held task %s: %w", out.TaskID, err)
	}
	count := 0
	if out.Length > 0 {
		count = piece.Count(out.Length, out.PieceSize)
	}
	for _, pd := range h.GetPieces() {
		if err := checkPieces(count, []int32{pd.GetNumber()}); err != nil {
			return out, fmt.Errorf("held task %s: %w", out.TaskID, err)
		}
		if err := checkPieceDigest(pd.GetDigest()); err != nil {
			return out, fmt.Errorf("held task %s piece %d: %w", out.TaskID, pd.GetNumber(), err)
		}
		out.Pieces[int(pd.GetNumber())] = pd.GetDigest()
	}
	rs, err := rangesOf(h.GetRanges())
	if err != nil {
		return out, fmt.Errorf("held task %s: %w", out.TaskID, err)
	}
	out.Ranges = rs
	return out, nil
}

// Announce registers a peer or refreshes it; an unknown peer that did not
// send its holdings is asked to (resync). A seed gets its queued work.
func (srv *Server) Announce(ctx context.Context, req *schedulerpb.AnnounceRequest) (*schedulerpb.AnnounceResponse, error) {
	p, err := peerOf(req.GetPeer())
	if err != nil {
		return nil, invalid("announce: %v", err)
	}
	// Over cluster TLS a peer is its certificate: the ID must be its CN
	// and a seed must hold the seed role, or any member could take a
	// seed's work or pose as another peer.
	if err := cluster.CheckPeer(ctx, p.ID, p.Seed); err != nil {
		srv.log.Warn("announce refused", "peer", p.ID, "seed", p.Seed, "err", err)
		return nil, err
	}
	if err := srv.s.AdmitPeer(p); err != nil {
		return nil, limited("announce of peer %s: %v", p.ID, err)
	}
	var known bool
	if req.GetFull() {
		if n := len(req.GetTasks()); n > maxTasksPerPeer {
			return nil, invalid("announce of peer %s: %d tasks, at most %d", p.ID, n, maxTasksPerPeer)
		}
		pieces := 0
		for _, h := range req.GetTasks() {
			pieces += len(h.GetPieces())
		}
		if pieces > maxHeldPieces {
			return nil, invalid("announce of peer %s: %d pieces, at most %d", p.ID, pieces, maxHeldPieces)
		}
		held := make([]HeldTask, 0, len(req.GetTasks()))
		for _, h := range req.GetTasks() {
			ht, err := heldOf(h)
			if err != nil {
				return nil, invalid("announce of peer %s: %v", p.ID, err)
			}
			held = append(held, ht)
		}
		known = srv.s.AnnounceFull(p, held)
	} else {
		known = srv.s.Announce(p)
	}
	resp := &schedulerpb.AnnounceResponse{Resync: !known && !req.GetFull()}
	if !known {
		srv.log.Info("peer joined", "peer", p.ID, "ip", p.IP, "port", p.UploadPort, "seed", p.Seed,
			"full", req.GetFull(), "tasks", len(req.GetTasks()))
	}
	if p.Seed {
		for _, w := range srv.s.TakeWork(p.ID) {
			resp.Work = append(resp.Work, workPB(w))
			srv.log.Debug("work handed to seed", "seed", p.ID, "task", w.TaskID)
		}
	}
	return resp, nil
}

// Leave forgets a peer.
func (srv *Server) Leave(_ context.Context, req *schedulerpb.LeaveRequest) (*schedulerpb.LeaveResponse, error) {
	if req.GetPeerId() == "" {
		return nil, invalid("leave: peer id missing")
	}
	srv.s.Leave(req.GetPeerId())
	srv.log.Info("peer left", "peer", req.GetPeerId())
	return &schedulerpb.LeaveResponse{}, nil
}

// RegisterTask records a task and may queue it for a seed.
func (srv *Server) RegisterTask(_ context.Context, req *schedulerpb.RegisterTaskRequest) (*schedulerpb.RegisterTaskResponse, error) {
	if req.GetPeerId() == "" {
		return nil, invalid("register task: peer id missing")
	}
	w, err := workOf(req.GetTask())
	if err != nil {
		return nil, invalid("register task: %v", err)
	}
	if err := checkSize(req.GetLength(), req.GetPieceSize()); err != nil {
		return nil, invalid("register task %s: %v", w.TaskID, err)
	}
	if err := srv.s.AdmitTask(req.GetPeerId(), w.TaskID); err != nil {
		return nil, limited("register task %s: %v", w.TaskID, err)
	}
	l, ps, seed := srv.s.RegisterTask(req.GetPeerId(), w, req.GetLength(), req.GetPieceSize())
	if seed != "" {
		srv.log.Info("task queued for a seed", "task", w.TaskID, "seed", seed, "requester", req.GetPeerId())
	}
	return &schedulerpb.RegisterTaskResponse{Length: l, PieceSize: ps}, nil
}

// Schedule answers where to get each piece a peer lacks.
func (srv *Server) Schedule(_ context.Context, req *schedulerpb.ScheduleRequest) (*schedulerpb.ScheduleResponse, error) {
	if req.GetPeerId() == "" || req.GetTaskId() == "" {
		return nil, invalid("schedule: peer id or task id missing")
	}
	if n := len(req.GetPieces()); n > maxPiecesPerCall {
		return nil, invalid("schedule task %s: %d pieces, at most %d a call", req.GetTaskId(), n, maxPiecesPerCall)
	}
	if err := srv.s.AdmitTask(req.GetPeerId(), req.GetTaskId()); err != nil {
		return nil, limited("schedule task %s: %v", req.GetTaskId(), err)
	}
	count := 0
	if l, ps, ok := srv.s.Task(req.GetTaskId()); ok {
		count = piece.Count(l, ps)
	}
	if err := checkPieces(count, req.GetPieces()); err != nil {
		return nil, invalid("schedule task %s: %v", req.GetTaskId(), err)
	}
	// A piece asked twice in one call would be claimed twice.
	seen := make(map[int32]bool, len(req.GetPieces()))
	nums := make([]int, 0, len(req.GetPieces()))
	for _, n := range req.GetPieces() {
		if !seen[n] {
			seen[n] = true
			nums = append(nums, int(n))
		}
	}
	srv.schedules.Inc()
	resp := &schedulerpb.ScheduleResponse{Assignments: make([]*schedulerpb.Assignment, 0, len(nums))}
	for _, a := range srv.s.Schedule(req.GetPeerId(), req.GetTaskId(), nums) {
		pa := &schedulerpb.Assignment{Piece: int32(a.Piece), Digest: a.Digest, BackToSource: a.BackToSource, Wait: a.Wait}
		for _, p := range a.Parents {
			pa.Parents = append(pa.Parents, infoOf(p))
		}
		if a.BackToSource {
			srv.backToSource.Inc()
			srv.log.Debug("back to source", "peer", req.GetPeerId(), "task", req.GetTaskId(), "piece", a.Piece)
		}
		resp.Assignments = append(resp.Assignments, pa)
	}
	return resp, nil
}

// ReportPieces records pieces a peer now holds.
func (srv *Server) ReportPieces(_ context.Context, req *schedulerpb.ReportPiecesRequest) (*schedulerpb.ReportPiecesResponse, error) {
	if req.GetPeerId() == "" || req.GetTaskId() == "" {
		return nil, invalid("report pieces: peer id or task id missing")
	}
	if err := checkSize(req.GetLength(), req.GetPieceSize()); err != nil {
		return nil, invalid("report pieces of task %s: %v", req.GetTaskId(), err)
	}
	if n := len(req.GetPieces()); n > maxPiecesPerCall {
		return nil, invalid("report pieces of task %s: %d pieces, at most %d a call", req.GetTaskId(), n, maxPiecesPerCall)
	}
	if err := srv.s.AdmitTask(req.GetPeerId(), req.GetTaskId()); err != nil {
		return nil, limited("report pieces of task %s: %v", req.GetTaskId(), err)
	}
	count := 0
	if req.GetLength() > 0 {
		count = piece.Count(req.GetLength(), req.GetPieceSize())
	}
	pieces := make(map[int]string, len(req.GetPieces()))
	for _, pd := range req.GetPieces() {
		if err := checkPieces(count, []int32{pd.GetNumber()}); err != nil {
			return nil, invalid("report pieces of task %s: %v", req.GetTaskId(), err)
		}
		if err := checkPieceDigest(pd.GetDigest()); err != nil {
			return nil, invalid("report piece %d of task %s: %v", pd.GetNumber(), req.GetTaskId(), err)
		}
		pieces[int(pd.GetNumber())] = pd.GetDigest()
	}
	srv.s.ReportPieces(req.GetPeerId(), req.GetTaskId(), req.GetLength(), req.GetPieceSize(), pieces)
	return &schedulerpb.ReportPiecesResponse{}, nil
}

// ReportBadParent stops offering a parent that served a bad piece.
func (srv *Server) ReportBadParent(_ context.Context, req *schedulerpb.ReportBadParentRequest) (*schedulerpb.ReportBadParentResponse, error) {
	if req.GetPeerId() == "" || req.GetTaskId() == "" || req.GetParentId() == "" {
		return nil, invalid("report bad parent: peer id, task id or parent id missing")
	}
	srv.s.ReportBadParent(req.GetPeerId(), req.GetTaskId(), req.GetParentId())
	srv.log.Warn("bad parent reported", "peer", req.GetPeerId(), "task", req.GetTaskId(), "parent", req.GetParentId())
	return &schedulerpb.ReportBadParentResponse{}, nil
}

// Preheat queues tasks for seeds; seeds[i] is "" when no seed took task i.
func (srv *Server) Preheat(_ context.Context, req *schedulerpb.PreheatRequest) (*schedulerpb.PreheatResponse, error) {
	if n := len(req.GetTasks()); n > maxTasksPerCall {
		return nil, invalid("preheat: %d tasks, at most %d a call", n, maxTasksPerCall)
	}
	ws := make([]Work, 0, len(req.GetTasks()))
	for _, pw := range req.GetTasks() {
		w, err := workOf(pw)
		if err != nil {
			return nil, invalid("preheat: %v", err)
		}
		if w.URL == "" {
			return nil, invalid("preheat task %s: url missing", w.TaskID)
		}
		u, err := url.Parse(w.URL)
		if err != nil {
			return nil, invalid("preheat task %s: %v", w.TaskID, err)
		}
		if err := srv.preheatAllow.CheckURL(u); err != nil {
			return nil, status.Errorf(codes.PermissionDenied, "preheat task %s: %v", w.TaskID, err)
		}
		ws = append(ws, w)
	}
	return &schedulerpb.PreheatResponse{Seeds: srv.preheat(ws)}, nil
}

func (srv *Server) preheat(ws []Work) []string {
	seeds := make([]string, len(ws))
	for i, w := range ws {
		seed, ok := srv.s.Enqueue(w)
		if !ok {
			srv.preheats.WithLabelValues("no_seed").Inc()
			srv.log.Warn("preheat: no live seed peer", "task", w.TaskID)
			continue
		}
		seeds[i] = seed
		srv.preheats.WithLabelValues("queued").Inc()
		srv.log.Info("preheat queued", "task", w.TaskID, "url", w.URL, "seed", seed)
	}
	return seeds
}

// TaskStatus reports how far tasks have spread; an unknown task is all zeros.
func (srv *Server) TaskStatus(_ context.Context, req *schedulerpb.TaskStatusRequest) (*schedulerpb.TaskStatusResponse, error) {
	if n := len(req.GetTaskIds()); n > maxTasksPerCall {
		return nil, invalid("task status: %d tasks, at most %d a call", n, maxTasksPerCall)
	}
	resp := &schedulerpb.TaskStatusResponse{}
	for _, id := range req.GetTaskIds() {
		if id == "" {
			return nil, invalid("task status: empty task id")
		}
		st, _ := srv.s.TaskStatus(id)
		resp.Tasks = append(resp.Tasks, &schedulerpb.TaskState{TaskId: id, Length: st.Length, Pieces: int32(st.Pieces),
			Complete: int32(st.Complete), SeedsComplete: int32(st.SeedsComplete), Fetched: int32(st.Fetched),
			PieceSize: st.PieceSize})
	}
	return resp, nil
}

// PreheatTask is one task of an HTTP preheat request.
type PreheatTask struct {
	TaskID string              `json:"task_id"`
	URL    string              `json:"url"`
	Header map[string][]string `json:"header,omitempty"`
	Digest string              `json:"digest,omitempty"`
}

// PreheatRequest is the body of POST /api/v1/preheat.
type PreheatRequest struct {
	Tasks []PreheatTask `json:"tasks"`
}

// PreheatResponse answers POST /api/v1/preheat: Seeds[i] took Tasks[i].
type PreheatResponse struct {
	Seeds []string `json:"seeds"`
}

// maxPreheatBody bounds a preheat request: an image's layers over all its
// platforms with their headers are a few kilobytes each.
const maxPreheatBody = 4 << 20

// HTTPHandler serves the HTTP API:
//
//	GET  /healthy, /server/ping  200 "OK"
//	GET  /metrics                Prometheus metrics
//	POST /api/v1/preheat         {"tasks":[{"task_id","url","header","digest"}]} -> {"seeds":[...]}
//	GET  /api/v1/tasks/{id}      the task's TaskStatus as JSON
func (srv *Server) HTTPHandler() http.Handler {
	mux := http.NewServeMux()
	ok := func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("OK")) }
	mux.HandleFunc("/healthy", ok)
	mux.HandleFunc("/server/ping", ok)
	mux.Handle("GET /metrics", promhttp.HandlerFor(srv.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("POST /api/v1/preheat", srv.httpPreheat)
	mux.HandleFunc("GET /api/v1/tasks/{id...}", srv.httpTask)
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func httpError(w http.ResponseWriter, code int, format string, args ...any) {
	writeJSON(w, code, map[string]string{"error": fmt.Sprintf(format, args...)})
}

func (srv *Server) httpPreheat(w http.ResponseWriter, r *http.Request) {
	var req PreheatRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxPreheatBody)).Decode(&req); err != nil {
		httpError(w, http.StatusBadRequest, "preheat: bad JSON body: %v", err)
		return
	}
	if len(req.Tasks) == 0 {
		httpError(w, http.StatusBadRequest, "preheat: no tasks")
		return
	}
	ws := make([]Work, 0, len(req.Tasks))
	for i, t := range req.Tasks {
		if t.TaskID == "" || t.URL == "" {
			httpError(w, http.StatusBadRequest, "preheat: task %d: task_id and url are required", i)
			return
		}
		if err := checkBlobDigest(t.Digest); err != nil {
			httpError(w, http.StatusBadRequest, "preheat: task %s: %v", t.TaskID, err)
			return
		}
		// A seed fetches what it is told: only allowed registries, and
		// without the asker's headers (preheat_allow.go).
		if err := srv.checkPreheatTask(&t); err != nil {
			srv.log.Warn("preheat refused", "task", t.TaskID, "remote", r.RemoteAddr, "status", http.StatusForbidden, "err", err)
			httpError(w, http.StatusForbidden, "preheat: task %s: %v", t.TaskID, err)
			return
		}
		ws = append(ws, Work(t))
	}
	if _, seeds, _ := srv.s.Stats(); seeds == 0 {
		srv.preheats.WithLabelValues("no_seed").Add(float64(len(ws)))
		httpError(w, http.StatusServiceUnavailable,
			"preheat: no live seed peer: run starlingd --role seed with this scheduler in its --scheduler list")
		return
	}
	writeJSON(w, http.StatusOK, PreheatResponse{Seeds: srv.preheat(ws)})
}

func (srv *Server) httpTask(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	st, ok := srv.s.TaskStatus(id)
	if !ok {
		httpError(w, http.StatusNotFound, "task %s: unknown to this scheduler", id)
		return
	}
	writeJSON(w, http.StatusOK, st)
}
