package scheduler

import (
	"context"
	"errors"

	"github.com/starling-dev/starling/api/schedulerpb"
)

// maxRangesPerCall bounds the ranges one report or announce may carry.
const maxRangesPerCall = 1 << 14

func rangesOf(rs []*schedulerpb.ByteRange) ([]Range, error) {
	if len(rs) > maxRangesPerCall {
		return nil, errors.New("too many ranges")
	}
	out := make([]Range, 0, len(rs))
	for _, r := range rs {
		if r.GetOffset() < 0 || r.GetLength() <= 0 || r.GetOffset()+r.GetLength() < r.GetOffset() {
			return nil, errors.New("bad range")
		}
		out = append(out, Range{Off: r.GetOffset(), Len: r.GetLength()})
	}
	return out, nil
}

// ScheduleRange tells a lazy reader where to get a byte range.
func (srv *Server) ScheduleRange(ctx context.Context, req *schedulerpb.ScheduleRangeRequest) (*schedulerpb.ScheduleRangeResponse, error) {
	if req.GetPeerId() == "" || req.GetTaskId() == "" {
		return nil, invalid("schedule range: peer id or task id missing")
	}
	if err := srv.s.AdmitTask(req.GetPeerId(), req.GetTaskId()); err != nil {
		return nil, limited("schedule range of task %s: %v", req.GetTaskId(), err)
	}
	segs, err := srv.s.ScheduleRange(ctx, RangeRequest{
		PeerID: req.GetPeerId(), TaskID: req.GetTaskId(), Length: req.GetLength(),
		Range: Range{Off: req.GetRange().GetOffset(), Len: req.GetRange().GetLength()},
	})
	if errors.Is(err, ErrRangeInvalid) {
		return nil, invalid("schedule range of task %s: %v", req.GetTaskId(), err)
	}
	if err != nil {
		return nil, err
	}
	srv.schedules.Inc()
	resp := &schedulerpb.ScheduleRangeResponse{Segments: make([]*schedulerpb.RangeSegment, 0, len(segs))}
	for _, sg := range segs {
		ps := &schedulerpb.RangeSegment{Range: &schedulerpb.ByteRange{Offset: sg.Off, Length: sg.Len}, BackToSource: sg.BackToSource}
		for _, p := range sg.Parents {
			ps.Parents = append(ps.Parents, infoOf(p))
		}
		if sg.BackToSource {
			srv.backToSource.Inc()
		}
		resp.Segments = append(resp.Segments, ps)
	}
	return resp, nil
}

// ReportRanges records the byte ranges a peer holds or gives up.
func (srv *Server) ReportRanges(_ context.Context, req *schedulerpb.ReportRangesRequest) (*schedulerpb.ReportRangesResponse, error) {
	if req.GetPeerId() == "" || req.GetTaskId() == "" {
		return nil, invalid("report ranges: peer id or task id missing")
	}
	if err := srv.s.AdmitTask(req.GetPeerId(), req.GetTaskId()); err != nil {
		return nil, limited("report ranges of task %s: %v", req.GetTaskId(), err)
	}
	held, err := rangesOf(req.GetHeld())
	if err != nil {
		return nil, invalid("report ranges of task %s: %v", req.GetTaskId(), err)
	}
	released, err := rangesOf(req.GetReleased())
	if err != nil {
		return nil, invalid("report ranges of task %s: %v", req.GetTaskId(), err)
	}
	if err := srv.s.ReportRanges(req.GetPeerId(), req.GetTaskId(), req.GetLength(), held, released); err != nil {
		return nil, invalid("report ranges: %v", err)
	}
	return &schedulerpb.ReportRangesResponse{}, nil
}
