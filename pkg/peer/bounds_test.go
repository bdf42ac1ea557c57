package peer_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	pb "github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/piece"
)

// hostileScheduler answers what a compromised or fake scheduler could:
// piece size 1 (finding 4 of issue 11: peers allocated 2.1 GB), pieces
// nobody asked for, parents without an address, too many parents, digests
// that are none.
type hostileScheduler struct {
	pb.UnimplementedSchedulerServer
	schedules, ranges atomic.Int64
}

func (h *hostileScheduler) Announce(context.Context, *pb.AnnounceRequest) (*pb.AnnounceResponse, error) {
	return &pb.AnnounceResponse{}, nil
}

func (h *hostileScheduler) RegisterTask(_ context.Context, req *pb.RegisterTaskRequest) (*pb.RegisterTaskResponse, error) {
	return &pb.RegisterTaskResponse{Length: req.GetLength(), PieceSize: 1}, nil
}

func (h *hostileScheduler) Schedule(_ context.Context, req *pb.ScheduleRequest) (*pb.ScheduleResponse, error) {
	h.schedules.Add(1)
	resp := &pb.ScheduleResponse{}
	many := make([]*pb.PeerInfo, 1000)
	for i := range many {
		many[i] = &pb.PeerInfo{Id: "ghost", Ip: "not an ip", UploadPort: 70000}
	}
	for _, n := range []int32{-1, 1 << 30, 1<<31 - 1} {
		resp.Assignments = append(resp.Assignments, &pb.Assignment{Piece: n, BackToSource: true})
	}
	for _, n := range req.GetPieces() {
		// Twice: first with unusable parents and no real digest (so the
		// origin has it), then again, which must be ignored.
		resp.Assignments = append(resp.Assignments,
			&pb.Assignment{Piece: n, Digest: "zz", Parents: many},
			&pb.Assignment{Piece: n, Wait: true})
	}
	// A piece not asked for: the origin must not be asked for it again.
	resp.Assignments = append(resp.Assignments, &pb.Assignment{Piece: 0, BackToSource: true})
	return resp, nil
}

// ScheduleRange tiles the range in 1-byte segments: each would be a
// request of its own, at once.
func (h *hostileScheduler) ScheduleRange(_ context.Context, req *pb.ScheduleRangeRequest) (*pb.ScheduleRangeResponse, error) {
	h.ranges.Add(1)
	resp := &pb.ScheduleRangeResponse{}
	r := req.GetRange()
	for off := r.GetOffset(); off < r.GetOffset()+r.GetLength(); off++ {
		resp.Segments = append(resp.Segments, &pb.RangeSegment{Range: &pb.ByteRange{Offset: off, Length: 1},
			Parents: []*pb.PeerInfo{{Id: "ghost", Ip: "127.0.0.1", UploadPort: 1}}})
	}
	return resp, nil
}

func (h *hostileScheduler) ReportRanges(context.Context, *pb.ReportRangesRequest) (*pb.ReportRangesResponse, error) {
	return &pb.ReportRangesResponse{}, nil
}

func (h *hostileScheduler) ReportPieces(context.Context, *pb.ReportPiecesRequest) (*pb.ReportPiecesResponse, error) {
	return &pb.ReportPiecesResponse{}, nil
}

func (h *hostileScheduler) Leave(context.Context, *pb.LeaveRequest) (*pb.LeaveResponse, error) {
	return &pb.LeaveResponse{}, nil
}

type bytesSource struct {
	data    []byte
	fetched atomic.Int64
}

func (s *bytesSource) Size(context.Context) (int64, error) { return int64(len(s.data)), nil }

func (s *bytesSource) Fetch(_ context.Context, off, n int64) (io.ReadCloser, error) {
	s.fetched.Add(n)
	return io.NopCloser(bytes.NewReader(s.data[off : off+n])), nil
}

func startHostile(t *testing.T) (*hostileScheduler, string) {
	h := &hostileScheduler{}
	g := grpc.NewServer()
	pb.RegisterSchedulerServer(g, h)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)
	return h, l.Addr().String()
}

func TestPeerRefusesHostileSchedulerAnswers(t *testing.T) {
	h, addr := startHostile(t)

	p := newPeer(t, peer.Options{Schedulers: []string{addr}, Logger: quiet})
	data := make([]byte, 3<<20+5)
	_, _ = rand.Read(data)
	sum := sha256.Sum256(data)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	src := &bytesSource{data: data}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The scheduler may not be marked up yet: open until it was asked.
	var d *peer.Download
	var err error
	for {
		d, err = p.Open(ctx, peer.Request{TaskID: digest, Digest: digest, Source: src, Length: int64(len(data))})
		if err != nil {
			t.Fatal(err)
		}
		d.Start()
		if err := d.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		if h.schedules.Load() > 0 || ctx.Err() != nil {
			break
		}
		d.Close()
		peer.DiscardTask(p, digest)
		time.Sleep(50 * time.Millisecond)
	}
	defer d.Close()
	if ps := peer.PieceSizeOf(d); piece.Check(int64(len(data)), ps) != nil || ps != piece.SizeFor(int64(len(data))) {
		t.Fatalf("the peer cut the task in pieces of %d", ps)
	}
	got, err := io.ReadAll(d.NewReader(ctx, 0, -1))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes: %v", len(got), err)
	}
	if f := src.fetched.Load(); f != int64(len(data)) {
		t.Fatalf("the origin sent %d bytes for a %d-byte blob: pieces nobody asked for were fetched", f, len(data))
	}
}

// A configured piece size out of limits is brought within them, rather
// than registered and refused by every scheduler.
func TestPeerFitsConfiguredPieceSize(t *testing.T) {
	p := newPeer(t, peer.Options{PieceSize: 1, Logger: quiet})
	data := make([]byte, 200<<10)
	src := &bytesSource{data: data}
	d, err := p.Open(context.Background(), peer.Request{TaskID: "sha256:" + hex.EncodeToString(make([]byte, 32)), Source: src})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if ps := peer.PieceSizeOf(d); ps != piece.MinSize {
		t.Fatalf("piece size %d, want %d", ps, piece.MinSize)
	}
}

// A range answer of thousands of segments is refused (each would be read
// at once) and the read goes to the registry.
func TestPeerRefusesTooManySegments(t *testing.T) {
	h, addr := startHostile(t)
	p := newPeer(t, peer.Options{Schedulers: []string{addr}, Logger: quiet})
	mb, digest := newMemBlob(t, 256<<10)
	f := p.NewLazyFetcher(peer.Request{TaskID: digest, Digest: digest, Length: int64(len(mb.data)), Source: &bytesSource{data: mb.data}}, mb)
	defer f.Close()
	deadline := time.Now().Add(20 * time.Second)
	for h.ranges.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the peer never asked the scheduler for a range")
		}
		if got := readRange(t, f, 10, 5000); !bytes.Equal(got, mb.data[10:5010]) {
			t.Fatal("wrong bytes")
		}
		time.Sleep(50 * time.Millisecond)
	}
	before := mb.calls.Load()
	if got := readRange(t, f, 100<<10, 5000); !bytes.Equal(got, mb.data[100<<10:100<<10+5000]) {
		t.Fatal("wrong bytes after the hostile answer")
	}
	if mb.calls.Load() == before {
		t.Fatal("the read did not go to the registry")
	}
}
