package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/progress"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/scheduler"
	"github.com/starling-dev/starling/pkg/storage"
	"github.com/starling-dev/starling/pkg/taskid"
)

// pushIndex pushes an index of two random images (of no platform) and
// returns its reference and the digests of all its blobs. The plans of
// richer indexes are tested in pkg/preheat.
func pushIndex(t *testing.T, reg *testenv.Registry, repoTag string) (string, map[string]bool) {
	t.Helper()
	idx, err := random.Index(200<<10, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	c := registry.New(registry.DefaultConfig())
	ref, err := c.ParseReference(reg.Addr + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(context.Background(), ref, idx); err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	all := map[string]bool{}
	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		m, err := img.Manifest()
		if err != nil {
			t.Fatal(err)
		}
		all[m.Config.Digest.String()] = true
		for _, l := range m.Layers {
			all[l.Digest.String()] = true
		}
	}
	return ref.Name(), all
}

func TestPreheatArguments(t *testing.T) {
	reg := testenv.StartRegistry(t)
	image, _ := pushIndex(t, reg, "preheat/args:1")
	if _, _, err := runCmd(t, newPreheatCmd, image); err == nil || !strings.Contains(err.Error(), "no scheduler") {
		t.Errorf("no scheduler: err = %v", err)
	}
	if _, _, err := runCmd(t, newPreheatCmd, "--scheduler", "127.0.0.1:1", "--platform", "linux//", image); err == nil || !strings.Contains(err.Error(), "--platform") {
		t.Errorf("bad platform: err = %v", err)
	}
	if _, _, err := runCmd(t, newPreheatCmd, "--scheduler", "127.0.0.1:1", "-H", "nocolon", image); err == nil || !strings.Contains(err.Error(), "-H") {
		t.Errorf("bad header: err = %v", err)
	}
	// A scheduler that does not answer: one line naming it.
	dead := "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
	_, _, err := runCmd(t, newPreheatCmd, "--scheduler", dead, image)
	if err == nil || !strings.Contains(err.Error(), dead) || strings.Contains(err.Error(), "\n") {
		t.Errorf("dead scheduler: err = %v", err)
	}
	// An image that does not exist.
	if _, _, err := runCmd(t, newPreheatCmd, "--scheduler", dead, reg.Addr+"/preheat/none:1"); err == nil || !strings.Contains(err.Error(), "preheat/none") {
		t.Errorf("missing image: err = %v", err)
	}
}

// TestPreheatEndToEnd preheats a multi-platform image through two real
// schedulers onto a real seed peer, and finds every blob in the seed's
// storage afterwards.
func TestPreheatEndToEnd(t *testing.T) {
	reg := testenv.StartRegistry(t)
	image, all := pushIndex(t, reg, "preheat/e2e:1")
	s1, srv1 := testenv.StartScheduler(t)
	sch1 := srv1.Scheduler()
	s2, srv2 := testenv.StartScheduler(t)
	sch2 := srv2.Scheduler()
	scheds := []string{s1, s2}

	// With no seed, preheat says so at once.
	_, _, err := runCmd(t, newPreheatCmd, "--scheduler", strings.Join(scheds, ","), image)
	if err == nil || !strings.Contains(err.Error(), "no live seed peer at scheduler") {
		t.Fatalf("no seed: err = %v", err)
	}

	root := t.TempDir()
	seed, err := peer.New(peer.Options{Root: root, Seed: true, Schedulers: scheds, UploadListen: "127.0.0.1:0",
		AdvertiseIP: "127.0.0.1", AnnounceInterval: 100 * time.Millisecond, PieceSize: 256 << 10,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := seed.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			seed.Close()
		}
	})
	testenv.WaitFor(t, 10*time.Second, "the seed to announce itself", func() bool {
		_, n1, _ := sch1.Stats()
		_, n2, _ := sch2.Stats()
		return n1 == 1 && n2 == 1
	})

	out, events, err := runCmd(t, newPreheatCmd, "--scheduler", strings.Join(scheds, ","), "--timeout", "2m", image, "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	// Progress events on stderr, one JSON object a line, a "done" per blob.
	doneEvents := 0
	for _, line := range strings.Split(strings.TrimSpace(events), "\n") {
		var ev progress.Event
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("progress line %q: %v", line, err)
		}
		if ev.Event == "done" {
			doneEvents++
			if ev.Error != "" || ev.Current != ev.Total {
				t.Errorf("done event %+v", ev)
			}
		}
	}
	var res preheatOutput
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if doneEvents != len(all) {
		t.Errorf("%d done events for %d blobs", doneEvents, len(all))
	}
	if !res.Done || !res.Waited || len(res.Blobs) != len(all) {
		t.Errorf("summary: done=%v waited=%v %d blobs, want %d", res.Done, res.Waited, len(res.Blobs), len(all))
	}
	used := map[string]bool{}
	for _, b := range res.Blobs {
		if !b.Done || b.Seed != seed.ID() {
			t.Errorf("blob %s: done=%v seed=%q", b.Digest, b.Done, b.Seed)
		}
		if b.Scheduler != scheduler.Pick(b.TaskID, scheds) {
			t.Errorf("blob %s went to scheduler %s, not its rendezvous pick", b.Digest, b.Scheduler)
		}
		used[b.Scheduler] = true
	}
	t.Logf("%d blobs over %d schedulers", len(res.Blobs), len(used))

	// Again with --no-wait: it returns once the work is queued (the seed
	// already holds it all and ignores it).
	out, _, err = runCmd(t, newPreheatCmd, "--scheduler", strings.Join(scheds, ","), "--no-wait", image)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, fmt.Sprintf("queued %d blobs", len(all))) {
		t.Errorf("--no-wait said %q", out)
	}

	// The seed's storage holds every blob, whole.
	seed.Close()
	closed = true
	st, err := storage.Open(filepath.Join(root, "tasks"), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for d := range all {
		// A registry blob's task names its registry as well as its digest.
		id, _ := taskid.ForRegistryBlob(&url.URL{Scheme: "http", Host: reg.Addr, Path: "/v2/x/blobs/" + d})
		task, ok := st.Lookup(id)
		if !ok || !task.Done() {
			t.Errorf("the seed does not hold %s whole (stored: %v)", d, ok)
		}
	}
}
