package scheduler

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/piece"
	"github.com/starling-dev/starling/pkg/serve"
)

// Finding 3 of issue 11: a task of length 2^62 in pieces of 1 byte, then
// GET /api/v1/tasks/<id>, looped over the pieces under the global lock and
// every announce timed out. The registration is refused now, and a status
// costs what is stored, not what a client said.
func TestFrozenSchedulerRequestRefused(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)})
	w := &pb.Work{TaskId: "sha256:" + digestOf("frozen"), Url: "http://origin/frozen"}
	for _, size := range [][2]int64{{1 << 62, 1}, {256 << 20, 1}, {1 << 62, piece.MaxSize}, {piece.MaxLength, piece.MinSize},
		{10 << 20, piece.MaxSize + 1}} {
		err := register(ctx, c, "a", w, size[0], size[1])
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("register %d bytes in pieces of %d: %v, want InvalidArgument", size[0], size[1], err)
		}
		_, err = c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "a", TaskId: w.GetTaskId(), Length: size[0], PieceSize: size[1],
			Pieces: []*pb.PieceDigest{{Number: 0, Digest: digestOf("0")}}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("report %d bytes in pieces of %d: %v, want InvalidArgument", size[0], size[1], err)
		}
		if err := announceHeld(ctx, c, held("h", size[0], size[1], 0, digestOf("0"))); status.Code(err) != codes.InvalidArgument {
			t.Errorf("full announce of %d bytes in pieces of %d: %v, want InvalidArgument", size[0], size[1], err)
		}
	}
	if code := httpJSON(t, "GET", ts.http.URL+"/api/v1/tasks/"+w.GetTaskId(), "", nil); code != 404 {
		t.Fatalf("status of the refused task: %d", code)
	}

	// The state, behind the server, does not take such a size either.
	s := ts.srv.Scheduler()
	if l, ps, _ := s.RegisterTask("a", Work{TaskID: "direct"}, 1<<62, 1); l != 0 || ps != 0 {
		t.Fatalf("the state took %d bytes in pieces of %d", l, ps)
	}

	// The largest task there may be: a status walks its one stored
	// piece while another goroutine announces. Were the walk over the
	// piece count, the announces would wait for it; the test's deadline
	// catches a walk that never ends.
	big := "sha256:" + digestOf("big")
	if err := register(ctx, c, "a", &pb.Work{TaskId: big}, piece.MaxCount*piece.MinSize, piece.MinSize); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "a", TaskId: big, Length: piece.MaxCount * piece.MinSize,
		PieceSize: piece.MinSize, Pieces: []*pb.PieceDigest{{Number: piece.MaxCount - 1, Digest: digestOf("last")}}}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: peerInfo("b", false)}); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for range 50 {
		var st TaskStatus
		if code := httpJSON(t, "GET", ts.http.URL+"/api/v1/tasks/"+big, "", &st); code != 200 ||
			st.Pieces != piece.MaxCount || st.Fetched != 1 || st.Complete != 0 {
			t.Fatalf("status of the largest task: %d %+v", code, st)
		}
	}
	close(stop)
	wg.Wait()
	if _, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: peerInfo("a", false)}); err != nil {
		t.Fatalf("announce after the attack: %v", err)
	}
}

// Finding 4: the first registration fixed the piece size, with no
// minimum, and peers trusted it.
func TestPieceSizeOneRefused(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	id := "sha256:" + digestOf("poison")
	if err := register(ctx, c, "evil", &pb.Work{TaskId: id, Url: "http://origin/x"}, 256<<20, 1); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("piece size 1: %v", err)
	}
	reg, err := c.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: "good", Task: &pb.Work{TaskId: id}, Length: 256 << 20, PieceSize: 2 << 20})
	if err != nil || reg.GetLength() != 256<<20 || reg.GetPieceSize() != 2<<20 {
		t.Fatalf("the legitimate registration: %v %v", reg, err)
	}
}

// Finding 8: piece numbers per call are bounded, and so is what a task of
// unknown size keeps of them.
func TestScheduleBounded(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	many := make([]int32, maxPiecesPerCall+1)
	for i := range many {
		many[i] = int32(i)
	}
	if _, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "a", TaskId: "t", Pieces: many}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("schedule of %d pieces: %v", len(many), err)
	}
	if _, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "a", TaskId: "t", Pieces: []int32{piece.MaxCount}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("schedule of piece %d: %v", piece.MaxCount, err)
	}
	if _, err := c.ReportPieces(ctx, &pb.ReportPiecesRequest{PeerId: "a", TaskId: "t", Length: 1 << 30, PieceSize: piece.MinSize,
		Pieces: make([]*pb.PieceDigest, maxPiecesPerCall+1)}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("report of %d pieces: %v", maxPiecesPerCall+1, err)
	}
	// 50 calls of 1024 different piece numbers on tasks nobody sized.
	for call := range 50 {
		nums := make([]int32, maxPiecesPerCall)
		for i := range nums {
			nums[i] = int32(call*maxPiecesPerCall + i)
		}
		resp, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "a", TaskId: fmt.Sprint("unsized", call%2), Pieces: nums})
		if err != nil || len(resp.GetAssignments()) != len(nums) {
			t.Fatalf("schedule call %d: %v", call, err)
		}
	}
	s := ts.srv.Scheduler()
	s.mu.Lock()
	for _, id := range []string{"unsized0", "unsized1"} {
		if n := len(s.tasks[id].pieces); n > maxUnsizedPieces {
			t.Errorf("task %s keeps %d pieces", id, n)
		}
	}
	s.mu.Unlock()
}

// Peers and tasks beyond the limits are refused with ResourceExhausted,
// and the known ones keep working.
func TestServerLimits(t *testing.T) {
	ts := startServer(t, "127.0.0.1:0", Options{MaxPeers: 2, MaxTasks: 2})
	c := dial(t, ts.addr)
	ctx := ctxT(t)
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)})
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("b", false)})
	if _, err := c.Announce(ctx, &pb.AnnounceRequest{Peer: peerInfo("c", false)}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a third peer: %v", err)
	}
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)})
	for _, id := range []string{"t1", "t2"} {
		if err := register(ctx, c, "a", &pb.Work{TaskId: id}, 1<<20, piece.MinSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := register(ctx, c, "a", &pb.Work{TaskId: "t3"}, 1<<20, piece.MinSize); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a third task: %v", err)
	}
	if _, err := c.Schedule(ctx, &pb.ScheduleRequest{PeerId: "b", TaskId: "t4", Pieces: []int32{0}}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("schedule of a third task: %v", err)
	}
	if err := register(ctx, c, "b", &pb.Work{TaskId: "t1"}, 1<<20, piece.MinSize); err != nil {
		t.Fatalf("joining a known task: %v", err)
	}
	if _, _, tasks := ts.srv.Scheduler().Stats(); tasks != 2 {
		t.Fatalf("%d tasks kept", tasks)
	}
}

// Finding 8: 100k fake peers and tasks keep the scheduler's heap bounded,
// and registering does not walk every peer (20k took 67 s).
func TestFakeRegistrationsBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("100k registrations")
	}
	const n = DefaultMaxPeers
	s := New(Options{StartGrace: -1})
	for i := range 8 {
		s.Announce(Peer{ID: fmt.Sprint("seed", i), IP: "10.0.0.1", UploadPort: 4000, Capacity: 8, Seed: true})
	}
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	refused := 0
	for i := range n {
		p := Peer{ID: fmt.Sprintf("fake-%06d", i), IP: "10.1.2.3", UploadPort: 4000, Capacity: 8}
		if s.AdmitPeer(p) != nil {
			refused++
			continue
		}
		s.Announce(p)
		w := Work{TaskID: fmt.Sprintf("sha256:%064d", i), URL: "http://origin/x"}
		if err := s.AdmitTask(p.ID, w.TaskID); err != nil {
			t.Fatal(err)
		}
		s.RegisterTask(p.ID, w, 8<<20, piece.MinSize)
		s.ReportPieces(p.ID, w.TaskID, 8<<20, piece.MinSize, map[int]string{0: digestOf("0")})
	}
	if refused != 8 {
		t.Errorf("%d peers refused past the limit of %d, want the 8 over it", refused, n)
	}
	if err := s.AdmitPeer(Peer{ID: "one-more"}); err == nil {
		t.Error("a peer past the limit was admitted")
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d peers, %d tasks: heap %d MiB", n, n-refused, heap>>20)
	if heap > 256<<20 {
		t.Fatalf("heap grew %d MiB", heap>>20)
	}
	runtime.KeepAlive(s)
}

func TestRateLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	rl := newRateLimiter(1, 2, 2, func() time.Time { return now })
	for i, want := range []bool{true, true, false} {
		if got := rl.allow("a"); got != want {
			t.Fatalf("call %d: %v", i, got)
		}
	}
	if !rl.allow("b") {
		t.Fatal("another client was limited")
	}
	// Full: a third client shares one bucket until an idle one is dropped.
	if !rl.allow("c") || !rl.allow("d") || rl.allow("e") {
		t.Fatal("the shared bucket")
	}
	now = now.Add(time.Minute)
	if !rl.allow("c") || len(rl.by) > 2 {
		t.Fatalf("after a minute: %d buckets", len(rl.by))
	}

	ctx := grpcpeer.NewContext(context.Background(), &grpcpeer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 9), Port: 1}})
	info := &grpc.UnaryServerInfo{FullMethod: "/starling.Scheduler/Announce"}
	ok := func(context.Context, any) (any, error) { return "ok", nil }
	codesSeen := map[codes.Code]int{}
	for range 4 {
		_, err := rl.unary(ctx, nil, info, ok)
		codesSeen[status.Code(err)]++
	}
	if codesSeen[codes.OK] != 2 || codesSeen[codes.ResourceExhausted] != 2 {
		t.Fatalf("interceptor answers %v", codesSeen)
	}
}

// The options make a working server.
func TestGRPCServerOptions(t *testing.T) {
	srv, err := NewServer(New(Options{}), ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(GRPCServerOptions()...)
	srv.RegisterGRPC(g)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ll := serve.Limit(l, serve.DefaultLimits)
	go func() { _ = g.Serve(ll) }()
	defer g.Stop()
	conn, err := grpc.Dial(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := pb.NewSchedulerClient(conn)
	ctx := ctxT(t)
	announce(t, ctx, c, &pb.AnnounceRequest{Peer: peerInfo("a", false)})
	big := &pb.AnnounceRequest{Peer: peerInfo("a", false), Full: true,
		Tasks: []*pb.HeldTask{{TaskId: string(make([]byte, MaxRecvMsgSize))}}}
	if _, err := c.Announce(ctx, big); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a message over %d bytes: %v", MaxRecvMsgSize, err)
	}
}
