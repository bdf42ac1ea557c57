package scheduler

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	pb "github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/piece"
)

// fuzzInput hands out the fuzzer's bytes as the values of calls.
type fuzzInput struct{ b []byte }

func (in *fuzzInput) more() bool { return len(in.b) > 0 }

func (in *fuzzInput) byte() byte {
	if len(in.b) == 0 {
		return 0
	}
	c := in.b[0]
	in.b = in.b[1:]
	return c
}

func (in *fuzzInput) uint64() uint64 {
	var buf [8]byte
	n := copy(buf[:], in.b)
	in.b = in.b[n:]
	return binary.LittleEndian.Uint64(buf[:])
}

// length is a task length: raw, a few pieces, unknown or huge.
func (in *fuzzInput) length() int64 {
	switch in.byte() % 5 {
	case 0:
		return int64(in.uint64())
	case 1:
		return int64(in.byte()%16+1) * piece.MinSize / 3
	case 2:
		return 0
	case 3:
		return 1 << 62
	}
	return 4 * piece.MinSize
}

func (in *fuzzInput) pieceSize() int64 {
	switch in.byte() % 5 {
	case 0:
		return int64(in.uint64())
	case 1:
		return 1
	case 2:
		return 0
	}
	return piece.MinSize
}

func (in *fuzzInput) pieceNum() int32 {
	if c := in.byte(); c < 200 {
		return int32(c % 12)
	}
	return int32(in.uint64())
}

func (in *fuzzInput) offset() int64 {
	if c := in.byte(); c < 200 {
		return int64(c%16) * piece.MinSize / 4
	}
	return int64(in.uint64())
}

// FuzzSchedulerAPI runs random sequences of calls against an in-process
// Server, with hostile values among them: nothing panics, answers are
// well formed, and the state keeps its invariants and bounds.
func FuzzSchedulerAPI(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 1, 0, 1, 1, 1, 2, 1, 0, 2, 3, 0, 0, 1, 2})
	f.Add([]byte{1, 0, 0, 3, 1, 8, 2, 9, 4, 1, 0, 1, 1, 2, 0, 0})
	f.Add([]byte{0, 3, 1, 1, 2, 1, 1, 4, 3, 0, 0, 1, 1, 5, 2, 1, 9, 7, 1, 8, 40, 2, 2, 2, 255, 255, 255, 255})
	f.Fuzz(fuzzOne)
}

// fuzzOne is one run of FuzzSchedulerAPI.
func fuzzOne(t *testing.T, data []byte) {
	now := time.Unix(1_000_000_000, 0)
	s := New(Options{StartGrace: -1, Now: func() time.Time { return now }, MaxPeers: 5, MaxTasks: 3,
		PeerTTL: 10 * time.Second, FetchTTL: 5 * time.Second})
	srv, err := NewServer(s, ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	in := &fuzzInput{b: data}
	for op := 0; op < 64 && in.more(); op++ {
		peerID := fmt.Sprint("p", in.byte()%6)
		taskID := fmt.Sprint("t", in.byte()%4)
		switch in.byte() % 10 {
		case 0:
			req := &pb.AnnounceRequest{Peer: &pb.PeerInfo{Id: peerID, Ip: "10.0.0.1", UploadPort: 4000,
				Capacity: int32(in.byte() % 3), Load: int32(in.byte() % 3), Seed: in.byte()%4 == 0}}
			if in.byte()%2 == 0 {
				req.Full = true
				h := &pb.HeldTask{TaskId: taskID, Length: in.length(), PieceSize: in.pieceSize()}
				for range in.byte() % 4 {
					h.Pieces = append(h.Pieces, &pb.PieceDigest{Number: in.pieceNum(), Digest: digestOf(fmt.Sprint(in.byte() % 2))})
				}
				if in.byte()%2 == 0 {
					h.Ranges = append(h.Ranges, &pb.ByteRange{Offset: in.offset(), Length: in.offset()})
				}
				req.Tasks = append(req.Tasks, h)
			}
			_, _ = srv.Announce(ctx, req)
		case 1:
			w := &pb.Work{TaskId: taskID}
			if in.byte()%2 == 0 {
				w.Url = "http://origin/" + taskID
			}
			_, _ = srv.RegisterTask(ctx, &pb.RegisterTaskRequest{PeerId: peerID, Task: w, Length: in.length(), PieceSize: in.pieceSize()})
		case 2:
			var nums []int32
			for range in.byte() % 6 {
				nums = append(nums, in.pieceNum())
			}
			resp, err := srv.Schedule(ctx, &pb.ScheduleRequest{PeerId: peerID, TaskId: taskID, Pieces: nums})
			if err == nil {
				distinct := map[int32]bool{}
				for _, n := range nums {
					distinct[n] = true
				}
				if len(resp.GetAssignments()) != len(distinct) {
					t.Fatalf("schedule of %v: %d assignments", nums, len(resp.GetAssignments()))
				}
				for _, a := range resp.GetAssignments() {
					if !distinct[a.GetPiece()] || (a.GetBackToSource() && a.GetWait()) || (a.GetBackToSource() && len(a.GetParents()) > 0) {
						t.Fatalf("schedule of %v: assignment %v", nums, a)
					}
					if len(a.GetParents()) > s.o.MaxParents {
						t.Fatalf("%d parents", len(a.GetParents()))
					}
				}
			}
		case 3:
			off, n, length := in.offset(), in.offset(), in.length()
			resp, err := srv.ScheduleRange(ctx, &pb.ScheduleRangeRequest{PeerId: peerID, TaskId: taskID, Length: length,
				Range: &pb.ByteRange{Offset: off, Length: n}})
			if err == nil {
				pos := off
				for _, sg := range resp.GetSegments() {
					if sg.GetRange().GetOffset() != pos || sg.GetRange().GetLength() <= 0 {
						t.Fatalf("range %d+%d: segment %v at %d", off, n, sg.GetRange(), pos)
					}
					pos += sg.GetRange().GetLength()
				}
				if pos != off+n || len(resp.GetSegments()) > maxSegments+1 {
					t.Fatalf("range %d+%d: segments end at %d (%d)", off, n, pos, len(resp.GetSegments()))
				}
			}
		case 4:
			req := &pb.ReportPiecesRequest{PeerId: peerID, TaskId: taskID, Length: in.length(), PieceSize: in.pieceSize()}
			for range in.byte() % 4 {
				req.Pieces = append(req.Pieces, &pb.PieceDigest{Number: in.pieceNum(), Digest: digestOf(fmt.Sprint(in.byte() % 2))})
			}
			_, _ = srv.ReportPieces(ctx, req)
		case 5:
			_, _ = srv.ReportRanges(ctx, &pb.ReportRangesRequest{PeerId: peerID, TaskId: taskID, Length: in.length(),
				Held:     []*pb.ByteRange{{Offset: in.offset(), Length: in.offset()}},
				Released: []*pb.ByteRange{{Offset: in.offset(), Length: in.offset()}}})
		case 6:
			_, _ = srv.ReportBadParent(ctx, &pb.ReportBadParentRequest{PeerId: peerID, TaskId: taskID, ParentId: fmt.Sprint("p", in.byte()%6)})
		case 7:
			_, _ = srv.Leave(ctx, &pb.LeaveRequest{PeerId: peerID})
		case 8:
			now = now.Add(time.Duration(in.byte()%16) * time.Second)
			s.GC()
		case 9:
			resp, err := srv.TaskStatus(ctx, &pb.TaskStatusRequest{TaskIds: []string{taskID}})
			if err != nil {
				t.Fatal(err)
			}
			st := resp.GetTasks()[0]
			if st.GetFetched() > st.GetPieces() || st.GetComplete() > int32(len(s.peers)) || st.GetSeedsComplete() > st.GetComplete() {
				t.Fatalf("status %v", st)
			}
			_, _ = srv.Preheat(ctx, &pb.PreheatRequest{Tasks: []*pb.Work{{TaskId: taskID, Url: "http://origin/" + taskID}}})
		}
		checkInvariants(t, s)
	}
}

// checkInvariants checks what the state must keep true whatever it was told.
func checkInvariants(t *testing.T, s *Scheduler) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.peers) > s.o.MaxPeers || len(s.tasks) > s.o.MaxTasks {
		t.Fatalf("%d peers, %d tasks", len(s.peers), len(s.tasks))
	}
	for id, ps := range s.seeds {
		if s.peers[id] != ps || !ps.Seed {
			t.Fatalf("seed index: %s", id)
		}
	}
	for id, ps := range s.peers {
		if ps.Seed && s.seeds[id] != ps {
			t.Fatalf("seed %s not indexed", id)
		}
	}
	for pid, tids := range s.peerTasks {
		seen := map[string]bool{}
		for _, tid := range tids {
			if seen[tid] {
				t.Fatalf("peer %s lists task %s twice", pid, tid)
			}
			seen[tid] = true
			if tk := s.tasks[tid]; tk == nil || !tk.members[pid] {
				t.Fatalf("peer %s lists task %s it is no member of", pid, tid)
			}
		}
	}
	for id, tk := range s.tasks {
		if tk.length != 0 && !sizeOK(tk.length, tk.pieceSize) {
			t.Fatalf("task %s sized %d/%d", id, tk.length, tk.pieceSize)
		}
		if len(tk.pieces) > tk.count()+maxUnsizedPieces {
			t.Fatalf("task %s keeps %d pieces of %d", id, len(tk.pieces), tk.count())
		}
		held := map[string]int{}
		for n, p := range tk.pieces {
			if p.n != n || n < 0 || n >= piece.MaxCount {
				t.Fatalf("task %s piece %d", id, n)
			}
			for h := range p.holders {
				if n >= tk.count() {
					t.Fatalf("task %s: piece %d of %d held", id, n, tk.count())
				}
				held[h]++
			}
		}
		for h, c := range tk.held {
			if held[h] != c {
				t.Fatalf("task %s: peer %s counted %d pieces, holds %d", id, h, c, held[h])
			}
		}
		for m := range tk.members {
			found := false
			for _, tid := range s.peerTasks[m] {
				found = found || tid == id
			}
			if !found {
				t.Fatalf("member %s of task %s not indexed", m, id)
			}
		}
		if len(tk.rng.claims) > maxRangeClaims {
			t.Fatalf("task %s: %d claims", id, len(tk.rng.claims))
		}
	}
}
