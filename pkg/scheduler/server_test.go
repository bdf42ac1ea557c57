package scheduler

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/starling-dev/starling/api/schedulerpb"
)

// testServer is a Server on real TCP listeners: gRPC and HTTP.
type testServer struct {
	srv  *Server
	addr string
	g    *grpc.Server
	http *httptest.Server
}

// startServer serves a new Scheduler on addr ("127.0.0.1:0" for any port).
func startServer(t *testing.T, addr string, o Options) *testServer {
	t.Helper()
	if o.StartGrace == 0 {
		// These tests start asking at once; TestStartGraceWaitsForReannounce
		// covers the grace.
		o.StartGrace = -1
	}
	srv, err := NewServer(New(o), ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.RegisterGRPC(g)
	go func() { _ = g.Serve(l) }()
	hs := httptest.NewServer(srv.HTTPHandler())
	ts := &testServer{srv: srv, addr: l.Addr().String(), g: g, http: hs}
	t.Cleanup(ts.stop)
	return ts
}

func (ts *testServer) stop() {
	ts.g.Stop()
	ts.http.Close()
}

// metric returns the value of a sample as /metrics shows it ("" when absent).
func (ts *testServer) metric(t *testing.T, sample string) string {
	t.Helper()
	resp, err := http.Get(ts.http.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			return v
		}
	}
	return ""
}

func dial(t *testing.T, addr string) pb.SchedulerClient {
	t.Helper()
	conn, err := grpc.Dial(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewSchedulerClient(conn)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func peerInfo(id string, seed bool) *pb.PeerInfo {
	return &pb.PeerInfo{Id: id, Ip: "127.0.0.1", UploadPort: 4000, Capacity: 4, Seed: seed}
}

func digestOf(s string) string { return fmt.Sprintf("%064x", s) }

func announce(t *testing.T, ctx context.Context, c pb.SchedulerClient, req *pb.AnnounceRequest) *pb.AnnounceResponse {
	t.Helper()
	resp, err := c.Announce(ctx, req, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("announce %s: %v", req.GetPeer().GetId(), err)
	}
	return resp
}

func schedule(t *testing.T, ctx context.Context, c pb.SchedulerClient, peer, task string, pieces ...int32) []*pb.Assignment {
	t.Helper()
	resp, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: peer, TaskId: task, Pieces: pieces})
	if err != nil {
		t.Fatalf("schedule %s for %s: %v", task, peer, err)
	}
	if len(resp.GetAssignments()) != len(pieces) {
		t.Fatalf("%d assignments for %d pieces", len(resp.GetAssignments()), len(pieces))
	}
	return resp.GetAssignments()
}

func kind(a *pb.Assignment) string {
	switch {
	case len(a.GetParents()) > 0:
		ids := []string{}
		for _, p := range a.GetParents() {
			ids = append(ids, p.GetId())
		}
		return "parents:" + strings.Join(ids, ",")
	case a.GetBackToSource():
		return "origin"
	case a.GetWait():
		return "wait"
	}
	return "nothing"
}

func TestServerManyRequestersOneOriginFetchPerPiece(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	const peers = 100
	for i := range peers {
		announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo(fmt.Sprint("p", i), false)})
	}
	var origin, waits atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, peers)
	for i := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			resp, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: fmt.Sprint("p", i), TaskId: "task", Pieces: []int32{0, 1, 2}})
			if err != nil {
				errs <- err
				return
			}
			for _, a := range resp.GetAssignments() {
				if a.GetBackToSource() {
					origin.Add(1)
				}
				if a.GetWait() {
					waits.Add(1)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if origin.Load() != 3 || waits.Load() != 3*peers-3 {
		t.Fatalf("%d origin fetches and %d waits for 3 pieces and %d peers", origin.Load(), waits.Load(), peers)
	}
	if n := ts.metric(t, "starling_scheduler_back_to_source_total"); n != "3" {
		t.Fatalf("back_to_source metric %s", n)
	}
	if n := ts.metric(t, "starling_scheduler_schedule_requests_total"); n != fmt.Sprint(peers) {
		t.Fatalf("schedule_requests metric %s", n)
	}
}

func TestServerRestartResync(t *testing.T) {
	old := startServer(t, "127.0.0.1:0", Options{})
	addr := old.addr
	c := dial(t, addr) // one connection, as a peer keeps across the restart
	ctx := ctxT(t)
	held := []*pb.HeldTask{{TaskId: "t", Length: 5 * psz / 2, PieceSize: psz, Pieces: []*pb.PieceDigest{
		{Number: 0, Digest: digestOf("0")}, {Number: 1, Digest: digestOf("1")}, {Number: 2, Digest: digestOf("2")}}}}
	if r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)}); !r.GetResync() {
		t.Fatal("the first announce of a peer was not asked to resync")
	}
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false), Full: true, Tasks: held})
	if r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)}); r.GetResync() {
		t.Fatal("a known peer was asked to resync")
	}

	old.stop()
	fresh := startServer(t, addr, Options{})
	// The first call may still go out on the old, broken connection; a
	// peer just calls again at its next heartbeat.
	var r *pb.AnnounceResponse
	for {
		var err error
		r, err = c.Announce(ctx, &pb.AnnounceRequest{Peer: peerInfo("a", false)}, grpc.WaitForReady(true))
		if status.Code(err) == codes.Unavailable && ctx.Err() == nil {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		break
	}
	if !r.GetResync() {
		t.Fatal("the restarted scheduler did not ask for a resync")
	}
	if r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false), Full: true, Tasks: held}); r.GetResync() {
		t.Fatal("a full announce was answered resync")
	}
	if r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)}); r.GetResync() {
		t.Fatal("resync asked again after the full announce")
	}
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("b", false)})
	for _, a := range schedule(t, ctx, c, "b", "t", 0, 1, 2) {
		if kind(a) != "parents:a" || a.GetDigest() != digestOf(fmt.Sprint(a.GetPiece())) {
			t.Fatalf("after rebuild, piece %d: %s digest %q", a.GetPiece(), kind(a), a.GetDigest())
		}
	}
	st, err := c.TaskStatus(ctx, &pb.TaskStatusRequest{TaskIds: []string{"t"}})
	if err != nil {
		t.Fatal(err)
	}
	if s := st.GetTasks()[0]; s.GetLength() != 5*psz/2 || s.GetPieces() != 3 || s.GetComplete() != 1 || s.GetFetched() != 3 {
		t.Fatalf("rebuilt status %v", s)
	}
	if _, _, tasks := fresh.srv.Scheduler().Stats(); tasks != 1 {
		t.Fatalf("%d tasks after rebuild", tasks)
	}
}

func TestServerRegisterTaskQueuesSeedWork(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("seed", true)})
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)})
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("b", false)})
	work := &pb.Work{TaskId: "sha256:" + digestOf("blob"), Url: "http://registry/v2/x/blobs/sha256:" + digestOf("blob"),
		Header: map[string]*pb.HeaderValues{"Authorization": {Values: []string{"Bearer tok"}}}, Digest: "sha256:" + digestOf("blob")}
	reg, err := c.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: "a", Task: work, Length: 10 << 20, PieceSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if reg.GetLength() != 10<<20 || reg.GetPieceSize() != 4<<20 {
		t.Fatalf("registered size %v", reg)
	}
	// A later registration with another piece size learns the first one.
	if reg, err := c.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: "b", Task: work, Length: 10 << 20, PieceSize: 1 << 20}); err != nil || reg.GetPieceSize() != 4<<20 {
		t.Fatalf("second registration: %v %v", reg, err)
	}
	r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("seed", true)})
	if len(r.GetWork()) != 1 {
		t.Fatalf("the seed got %d works, want 1", len(r.GetWork()))
	}
	w := r.GetWork()[0]
	if w.GetTaskId() != work.GetTaskId() || w.GetUrl() != work.GetUrl() || w.GetDigest() != work.GetDigest() {
		t.Fatalf("seed work %v", w)
	}
	// No credential travels through the scheduler: the seed uses its own.
	if len(w.GetHeader()) != 0 {
		t.Fatalf("the seed got the registering peer's headers: %v", w.GetHeader())
	}
	if r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("seed", true)}); len(r.GetWork()) != 0 {
		t.Fatalf("work handed out twice: %v", r.GetWork())
	}
	if r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)}); len(r.GetWork()) != 0 {
		t.Fatal("a plain peer got seed work")
	}
	for _, a := range schedule(t, ctx, c, "a", work.GetTaskId(), 0, 1, 2) {
		if kind(a) != "wait" {
			t.Fatalf("plain peer, piece %d: %s, want wait for the seed", a.GetPiece(), kind(a))
		}
	}
	for _, a := range schedule(t, ctx, c, "seed", work.GetTaskId(), 0, 1, 2) {
		if kind(a) != "origin" {
			t.Fatalf("seed, piece %d: %s, want origin", a.GetPiece(), kind(a))
		}
	}
	if _, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "seed", TaskId: work.GetTaskId(), Length: 10 << 20,
		PieceSize: 4 << 20, Pieces: []*pb.PieceDigest{{Number: 0, Digest: digestOf("p0")}}}); err != nil {
		t.Fatal(err)
	}
	got := schedule(t, ctx, c, "b", work.GetTaskId(), 0, 1)
	if kind(got[0]) != "parents:seed" || got[0].GetDigest() != digestOf("p0") || kind(got[1]) != "wait" {
		t.Fatalf("after the seed's first piece: %s %s", kind(got[0]), kind(got[1]))
	}
	if n := ts.metric(t, "starling_scheduler_back_to_source_total"); n != "3" {
		t.Fatalf("back_to_source metric %s, want the seed's 3", n)
	}
}

func httpJSON(t *testing.T, method, url, body string, into any) int {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if into != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, into); err != nil {
			t.Fatalf("%s %s: %v in %q", method, url, err, b)
		}
	}
	if resp.StatusCode != http.StatusOK {
		t.Logf("%s %s: %d %s", method, url, resp.StatusCode, b)
	}
	return resp.StatusCode
}

func TestServerHTTPPreheatAndStatus(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	base := ts.http.URL
	for _, p := range []string{"/healthy", "/server/ping"} {
		resp, err := http.Get(base + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "OK" {
			t.Fatalf("%s: %d %q", p, resp.StatusCode, b)
		}
	}
	body := `{"tasks":[{"task_id":"t1","url":"http://origin/t1","header":{"Authorization":["Basic x"]},"digest":"sha256:` + digestOf("t1") + `"},
		{"task_id":"t2","url":"http://origin/t2"}]}`
	if code := httpJSON(t, "POST", base+"/api/v1/preheat", body, nil); code != http.StatusServiceUnavailable {
		t.Fatalf("preheat without a seed: %d, want 503", code)
	}
	for _, bad := range []string{`{`, `{"tasks":[]}`, `{"tasks":[{"task_id":"t1"}]}`, `{"tasks":[{"url":"http://o/"}]}`,
		`{"tasks":[{"task_id":"t1","url":"http://o/","digest":"md5:00"}]}`} {
		if code := httpJSON(t, "POST", base+"/api/v1/preheat", bad, nil); code != http.StatusBadRequest {
			t.Fatalf("preheat %s: %d, want 400", bad, code)
		}
	}
	if code := httpJSON(t, "GET", base+"/api/v1/preheat", "", nil); code != http.StatusMethodNotAllowed {
		t.Fatalf("GET preheat: %d", code)
	}

	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("seed", true)})
	var pr PreheatResponse
	if code := httpJSON(t, "POST", base+"/api/v1/preheat", body, &pr); code != 200 || fmt.Sprint(pr.Seeds) != "[seed seed]" {
		t.Fatalf("preheat: %d %v", code, pr.Seeds)
	}
	r := announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("seed", true)})
	// The asker's credentials stay with it (preheat_allow.go).
	if len(r.GetWork()) != 2 || r.GetWork()[0].GetHeader()["Authorization"] != nil ||
		r.GetWork()[0].GetDigest() != "sha256:"+digestOf("t1") || r.GetWork()[1].GetUrl() != "http://origin/t2" {
		t.Fatalf("seed work after preheat: %v", r.GetWork())
	}

	var st TaskStatus
	if code := httpJSON(t, "GET", base+"/api/v1/tasks/t1", "", &st); code != 200 || st != (TaskStatus{TaskID: "t1"}) {
		t.Fatalf("status before any piece: %d %+v", code, st)
	}
	report := func(n int32) {
		if _, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "seed", TaskId: "t1", Length: 8 << 20, PieceSize: 4 << 20,
			Pieces: []*pb.PieceDigest{{Number: n, Digest: digestOf(fmt.Sprint(n))}}}); err != nil {
			t.Fatal(err)
		}
	}
	report(0)
	httpJSON(t, "GET", base+"/api/v1/tasks/t1", "", &st)
	if st != (TaskStatus{TaskID: "t1", Length: 8 << 20, PieceSize: 4 << 20, Pieces: 2, Fetched: 1}) {
		t.Fatalf("status after piece 0: %+v", st)
	}
	report(1)
	httpJSON(t, "GET", base+"/api/v1/tasks/t1", "", &st)
	if st.Complete != 1 || st.SeedsComplete != 1 || st.Fetched != 2 {
		t.Fatalf("status after both pieces: %+v", st)
	}
	gs, err := c.TaskStatus(ctx, &pb.TaskStatusRequest{TaskIds: []string{"t1", "nope"}})
	if err != nil {
		t.Fatal(err)
	}
	if s := gs.GetTasks()[0]; s.GetComplete() != 1 || s.GetSeedsComplete() != 1 || s.GetPieces() != 2 || s.GetLength() != 8<<20 {
		t.Fatalf("gRPC status %v", s)
	}
	if s := gs.GetTasks()[1]; s.GetTaskId() != "nope" || s.GetPieces() != 0 {
		t.Fatalf("gRPC status of an unknown task %v", s)
	}
	blobID := "sha256:" + digestOf("t2")
	if _, err := c.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: "seed", Task: &pb.Work{TaskId: blobID}, Length: 1, PieceSize: psz}); err != nil {
		t.Fatal(err)
	}
	if code := httpJSON(t, "GET", base+"/api/v1/tasks/"+blobID, "", &st); code != 200 || st.TaskID != blobID || st.Pieces != 1 {
		t.Fatalf("status of a blob task: %d %+v", code, st)
	}
	if code := httpJSON(t, "GET", base+"/api/v1/tasks/nope", "", nil); code != http.StatusNotFound {
		t.Fatalf("unknown task: %d", code)
	}

	// gRPC preheat, and what /metrics says of it all.
	if p, err := c.Preheat(ctx, &pb.PreheatRequest{Tasks: []*pb.Work{{TaskId: "t3", Url: "http://origin/t3"}}}); err != nil || p.GetSeeds()[0] != "seed" {
		t.Fatalf("gRPC preheat: %v %v", p, err)
	}
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`starling_scheduler_peers{role="seed"} 1`, `starling_scheduler_peers{role="peer"} 0`,
		"starling_scheduler_tasks 4", `starling_scheduler_preheat_tasks_total{result="queued"} 3`,
		`starling_scheduler_preheat_tasks_total{result="no_seed"} 2`,
		"starling_scheduler_schedule_requests_total 0", "starling_scheduler_back_to_source_total 0"} {
		if !strings.Contains(string(m), want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, m)
		}
	}
}

func TestServerInvalidArgument(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	if _, err := c.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: "a", Task: &pb.Work{TaskId: "sized"}, Length: 2 * psz, PieceSize: psz}); err != nil {
		t.Fatal(err)
	}
	good := digestOf("zz") // hex with letters, so upper case differs
	calls := map[string]func() error{
		"announce without peer": func() error { _, err := c.Announce(ctx, &pb.AnnounceRequest{}); return err },
		"announce empty id":     func() error { _, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: &pb.PeerInfo{}}); return err },
		"announce capacity, no ip": func() error {
			_, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: &pb.PeerInfo{Id: "a", Capacity: 2}})
			return err
		},
		"announce bad ip": func() error {
			_, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: &pb.PeerInfo{Id: "a", Ip: "x", UploadPort: 1}})
			return err
		},
		"announce negative load": func() error {
			_, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: &pb.PeerInfo{Id: "a", Load: -1}})
			return err
		},
		"full announce, empty task":   func() error { return announceHeld(ctx, c, &pb.HeldTask{}) },
		"full announce, bad digest":   func() error { return announceHeld(ctx, c, held("t", 2*psz, psz, 0, "nothex")) },
		"full announce, out of range": func() error { return announceHeld(ctx, c, held("t", 2*psz, psz, 2, good)) },
		"full announce, no piece size": func() error {
			return announceHeld(ctx, c, held("t", 2*psz, 0, 0, good))
		},
		"leave empty":                 func() error { _, err := c.Leave(ctx, &pb.LeaveRequest{}); return err },
		"register without peer":       func() error { return register(ctx, c, "", &pb.Work{TaskId: "t"}, 0, 0) },
		"register without task":       func() error { return register(ctx, c, "a", nil, 0, 0) },
		"register empty task id":      func() error { return register(ctx, c, "a", &pb.Work{}, 0, 0) },
		"register bad digest":         func() error { return register(ctx, c, "a", &pb.Work{TaskId: "t", Digest: "md5:00"}, 0, 0) },
		"register negative length":    func() error { return register(ctx, c, "a", &pb.Work{TaskId: "t"}, -1, psz) },
		"register without piece size": func() error { return register(ctx, c, "a", &pb.Work{TaskId: "t"}, 2*psz, 0) },
		"schedule without peer": func() error {
			_, err := c.Schedule(ctx, &pb.ScheduleRequest{TaskId: "t", Pieces: []int32{0}})
			return err
		},
		"schedule without task": func() error {
			_, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "a", Pieces: []int32{0}})
			return err
		},
		"schedule negative piece": func() error {
			_, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "a", TaskId: "t", Pieces: []int32{-1}})
			return err
		},
		"schedule piece out of range": func() error {
			_, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "a", TaskId: "sized", Pieces: []int32{2}})
			return err
		},
		"report without task": func() error {
			_, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "a"})
			return err
		},
		"report bad digest": func() error {
			_, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "a", TaskId: "t", Length: 2 * psz, PieceSize: psz,
				Pieces: []*pb.PieceDigest{{Number: 0, Digest: strings.ToUpper(good)}}})
			return err
		},
		"report piece out of range": func() error {
			_, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "a", TaskId: "t", Length: 2 * psz, PieceSize: psz,
				Pieces: []*pb.PieceDigest{{Number: 2, Digest: good}}})
			return err
		},
		"bad parent without parent": func() error {
			_, err := c.ReportBadParent(ctx, &pb.ReportBadParentRequest{PeerId: "a", TaskId: "t"})
			return err
		},
		"preheat empty task id": func() error {
			_, err := c.Preheat(ctx, &pb.PreheatRequest{Tasks: []*pb.Work{{Url: "http://o/"}}})
			return err
		},
		"preheat without url": func() error {
			_, err := c.Preheat(ctx, &pb.PreheatRequest{Tasks: []*pb.Work{{TaskId: "t"}}})
			return err
		},
		"status empty id": func() error {
			_, err := c.TaskStatus(ctx, &pb.TaskStatusRequest{TaskIds: []string{""}})
			return err
		},
	}
	for name, call := range calls {
		if err := call(); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
}

func held(task string, length, pieceSize int64, n int32, digest string) *pb.HeldTask {
	return &pb.HeldTask{TaskId: task, Length: length, PieceSize: pieceSize, Pieces: []*pb.PieceDigest{{Number: n, Digest: digest}}}
}

func announceHeld(ctx context.Context, c pb.SchedulerClient, h *pb.HeldTask) error {
	_, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: &pb.PeerInfo{Id: "a"}, Full: true, Tasks: []*pb.HeldTask{h}})
	return err
}

func register(ctx context.Context, c pb.SchedulerClient, peer string, w *pb.Work, length, pieceSize int64) error {
	_, err := c.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: peer, Task: w, Length: length, PieceSize: pieceSize})
	return err
}
