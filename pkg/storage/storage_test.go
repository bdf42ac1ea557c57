package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"
	"time"
)

func sum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func TestPiecesSurviveRestartAndVerify(t *testing.T) {
	dir := t.TempDir()
	blob := make([]byte, 10)
	for i := range blob {
		blob[i] = byte(i)
	}
	id := "sha256:" + sum(blob)
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	tk, err := s.Task(id, 10, 4, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.WritePiece(0, blob[0:4], sum(blob[0:4])); err != nil {
		t.Fatal(err)
	}
	if err := tk.WritePiece(1, blob[4:8], sum([]byte("nope"))); !errors.Is(err, ErrPieceDigest) {
		t.Fatalf("a bad piece was stored: %v", err)
	}
	s.Close()

	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tk, ok := s.Lookup(id)
	if !ok || !tk.HasPiece(0) || tk.HasPiece(1) {
		t.Fatalf("after restart: found %v, pieces %v", ok, tk.Pieces())
	}
	if err := tk.Finish(); err == nil {
		t.Fatal("an incomplete task finished")
	}
	tk.WritePiece(1, blob[4:8], sum(blob[4:8]))
	tk.WritePiece(2, blob[8:], sum(blob[8:]))
	if err := tk.Finish(); err != nil || !tk.Done() {
		t.Fatalf("finish: %v", err)
	}
	data, _, ok, err := tk.ReadPiece(2)
	if err != nil || !ok || string(data) != string(blob[8:]) {
		t.Fatalf("read piece: %v %v", ok, err)
	}
}

func TestWrongWholeDigestDiscards(t *testing.T) {
	s, _ := Open(t.TempDir(), Options{})
	defer s.Close()
	id := "sha256:" + sum([]byte("expected"))
	tk, _ := s.Task(id, 4, 4, id)
	tk.WritePiece(0, []byte("evil"), sum([]byte("evil")))
	if err := tk.Finish(); !errors.Is(err, ErrTaskDigest) {
		t.Fatalf("want ErrTaskDigest, got %v", err)
	}
	if _, ok := s.Lookup(id); ok {
		t.Fatal("a task with the wrong digest was kept")
	}
}

func TestGCByAgeAndQuota(t *testing.T) {
	s, _ := Open(t.TempDir(), Options{Quota: 100, HighWatermark: 0.9, LowWatermark: 0.5, MaxAge: time.Hour})
	defer s.Close()
	var ids []string
	for i := 0; i < 5; i++ {
		id := fmt.Sprintf("task%d", i)
		tk, err := s.Task(id, 20, 4, "")
		if err != nil {
			t.Fatal(err)
		}
		// The quota counts bytes held, not lengths: fill the task.
		for n := 0; n < 5; n++ {
			if err := tk.WritePiece(n, []byte("abcd"), sum([]byte("abcd"))); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, id)
		time.Sleep(5 * time.Millisecond)
	}
	busy, _ := s.Lookup(ids[0])
	busy.Acquire()
	// 100 bytes stored > 90: remove least recently used (not the busy one) until <= 50.
	removed := s.GC(time.Now())
	if len(removed) != 3 || removed[0] != ids[1] {
		t.Fatalf("removed %v", removed)
	}
	if _, ok := s.Lookup(ids[0]); !ok {
		t.Fatal("a task in use was removed")
	}
	busy.Release()
	removed = s.GC(time.Now().Add(2 * time.Hour))
	if len(removed) != 2 {
		t.Fatalf("age collection removed %v", removed)
	}
}

func TestHoldings(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := []byte("0123456789")
	tk, err := s.Task("abc", int64(len(data)), 4, "")
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data[:4])
	if err := tk.WritePiece(0, data[:4], hex.EncodeToString(sum[:])); err != nil {
		t.Fatal(err)
	}
	h := s.Holdings()
	if len(h) != 1 || h[0].ID != "abc" || h[0].Length != 10 || h[0].PieceSize != 4 || h[0].Pieces[0] != hex.EncodeToString(sum[:]) || len(h[0].Pieces) != 1 {
		t.Fatalf("holdings: %+v", h)
	}
}

func TestSparseTaskCountsBytesHeld(t *testing.T) {
	s, _ := Open(t.TempDir(), Options{Quota: 100, HighWatermark: 0.9, LowWatermark: 0.5})
	defer s.Close()
	tk, err := s.Task("sparse", 1000, 100, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.WriteRange([]byte("0123456789"), 500); err != nil {
		t.Fatal(err)
	}
	if tk.Covered(500, 10) {
		t.Fatal("a range written but not marked counts as held")
	}
	if err := tk.MarkRange(500, 10); err != nil {
		t.Fatal(err)
	}
	if !tk.Covered(502, 8) || tk.Covered(495, 10) || tk.Covered(505, 10) {
		t.Fatal("Covered disagrees with the marked range")
	}
	if err := tk.MarkRange(990, 20); err == nil {
		t.Fatal("a range past the end was marked")
	}
	// 10 of 1000 bytes held: under the quota's high watermark.
	if removed := s.GC(time.Now()); len(removed) != 0 {
		t.Fatalf("a sparse task was collected by its length: %v", removed)
	}
	// Marks are written by FlushRanges (and the last Release, and Close).
	if hs := s.Holdings(); len(hs) != 1 || len(hs[0].Ranges) != 0 {
		t.Fatalf("a mark was written before FlushRanges: %+v", hs)
	}
	if err := tk.FlushRanges(true); err != nil {
		t.Fatal(err)
	}
	hs := s.Holdings()
	if len(hs) != 1 || !hs[0].Ranges.Covers(500, 510) {
		t.Fatalf("holdings %+v", hs)
	}
}
