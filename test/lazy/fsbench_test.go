//go:build bench

package lazy_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/convert"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/registry"
)

// TestBenchFS is part of `make bench-lazy`, not a test: it runs only with
// STARLING_BENCH=1, asserts nothing about time, and prints ratios measured
// in the same run against their baselines:
//   - the first 4 KiB read of a cold file against one ranged GET of one
//     chunk of it from the same origin;
//   - a fully cached 200 MiB file and a tree of small cached files read
//     through overlayfs over the lazy mount, against the same bytes in a
//     local directory under overlayfs, with the page cache hot and dropped.
func TestBenchFS(t *testing.T) {
	if os.Getenv("STARLING_BENCH") != "1" {
		t.Skip("benchmark; run with make bench-lazy")
	}
	testenv.Require(t, "docker-registry", "fusermount3")
	reg := testenv.StartRegistry(t)
	proxy := testenv.StartCountingProxy(t, reg.Addr)
	latency := 10 * time.Millisecond
	if v := os.Getenv("STARLING_BENCH_LATENCY"); v != "" {
		latency, _ = time.ParseDuration(v)
	}
	proxy.SetLatency(latency)
	c := registry.New(registry.DefaultConfig())
	ctx := context.Background()

	push := func(repo string, img v1.Image, chunk int) (name.Repository, v1.Image) {
		conv := convert.New(convert.Options{WorkDir: t.TempDir(), ChunkSize: chunk})
		defer conv.Close()
		out, _, err := conv.Image(ctx, repo, img)
		if err != nil {
			t.Fatal(err)
		}
		ref, _ := c.ParseReference(reg.Addr + "/" + repo + ":esgz")
		if err := c.Write(ctx, ref, out); err != nil {
			t.Fatal(err)
		}
		viaProxy, _ := name.NewRepository(proxy.Addr+"/"+repo, name.Insecure)
		return viaProxy, out
	}
	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch = false, false
	if os.Getenv("STARLING_BENCH_PASSTHROUGH") == "0" {
		fs.Passthrough = false
	}
	only := os.Getenv("STARLING_BENCH_ONLY") // cold, big or small: one part
	m, err := layer.NewManager(layer.Options{Root: t.TempDir(), Registry: c, FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	mountImage := func(repo name.Repository, img v1.Image) ([]string, []*layer.Layer) {
		mf, _ := img.Manifest()
		var dirs []string
		var ls []*layer.Layer
		for _, d := range mf.Layers {
			l, err := m.Resolve(ctx, repo, d)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			if err := l.Mount(dir); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = l.Unmount() })
			dirs = append(dirs, dir)
			ls = append(ls, l)
		}
		return dirs, ls
	}
	overlay := func(lower ...string) string {
		merged := t.TempDir()
		if len(lower) == 1 {
			// overlayfs needs two lower directories without an upper one.
			lower = append([]string{t.TempDir()}, lower...)
		}
		for i, j := 0, len(lower)-1; i < j; i, j = i+1, j-1 {
			lower[i], lower[j] = lower[j], lower[i]
		}
		testenv.Run(t, "mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir="+strings.Join(lower, ":"), merged)
		t.Cleanup(func() { _, _ = testenv.RunErr(context.Background(), "umount", "-l", merged) })
		return merged
	}

	var (
		repo                           name.Repository
		img                            v1.Image
		dirs                           []string
		ls                             []*layer.Layer
		lazyMerged, localMerged, local string
	)
	// 1. The first 4 KiB of a cold file.
	if only == "" || only == "cold" {
		const coldFiles, coldSize, chunk = 15, 4 << 20, 1 << 20
		repo, img = push("cold", must(t)(testimage.Large(coldFiles*coldSize, coldFiles)), chunk)
		dirs, ls = mountImage(repo, img)
		top, topDir := ls[len(ls)-1], dirs[len(dirs)-1]
		var lazyT, getT []time.Duration
		buf := make([]byte, 4096)
		for i := 0; i < coldFiles; i++ {
			p := fmt.Sprintf("large/f%04d", i)
			e, ok := top.Index().Lookup(p)
			if !ok {
				t.Fatalf("no %s", p)
			}
			// The baseline: one ranged GET of the file's first chunk.
			ch := e.Chunks[0]
			start := time.Now()
			rc, err := c.BlobRange(ctx, repo, top.Descriptor().Digest, ch.Offset, ch.End-ch.Offset)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, rc); err != nil {
				t.Fatal(err)
			}
			rc.Close()
			getT = append(getT, time.Since(start))

			f, err := os.Open(filepath.Join(topDir, p))
			if err != nil {
				t.Fatal(err)
			}
			start = time.Now()
			if _, err := f.ReadAt(buf, 0); err != nil {
				t.Fatal(err)
			}
			lazyT = append(lazyT, time.Since(start))
			f.Close()
		}
		l, g := median(lazyT), median(getT)
		fmt.Printf("\nbench-fs: %s, GOMAXPROCS %d, origin latency %s per request\n", runtime.GOARCH, runtime.GOMAXPROCS(0), latency)
		fmt.Printf("  first 4 KiB of a cold file:       %7.2f ms   one ranged GET of its chunk: %7.2f ms   ratio %.2f (target <= 1.2)\n",
			ms(l), ms(g), l.Seconds()/g.Seconds())
	}

	// 2. A fully cached 200 MiB file.
	const bigSize = 200 << 20
	if only == "" || only == "big" {
		repo, img = push("big", must(t)(testimage.Large(bigSize, 1)), 4<<20)
		dirs, _ = mountImage(repo, img)
		lazyMerged = overlay(dirs...)
		bigPath := "large/f0000"
		if _, err := readFile(filepath.Join(lazyMerged, bigPath)); err != nil { // fetch it all
			t.Fatal(err)
		}
		local = t.TempDir()
		if err := os.MkdirAll(filepath.Join(local, "large"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(local, bigPath), testimage.Random(100, bigSize), 0o644); err != nil {
			t.Fatal(err)
		}
		localMerged = overlay(local)
		time.Sleep(time.Second) // the file is assembled for passthrough in the background
		compareReads(t, lazyMerged, localMerged, bigPath, readFile, func(what string, lazy, local float64) {
			fmt.Printf("  cached 200 MiB file, %-18s lazy %7.0f MB/s   overlayfs %7.0f MB/s   ratio %.2f (target >= 0.9)\n",
				what+":", lazy/1e6, local/1e6, lazy/local)
		})
	}

	// 3. Many small cached files.
	if only != "" && only != "small" {
		return
	}
	const smallFiles = 1140
	var small testimage.Layer
	small = append(small, testimage.Entry{Name: "small/", Type: '5', Mode: 0o755})
	for i := 0; i < smallFiles; i++ {
		if i%100 == 0 {
			small = append(small, testimage.Entry{Name: fmt.Sprintf("small/d%02d/", i/100), Type: '5', Mode: 0o755})
		}
		small = append(small, testimage.Entry{Name: fmt.Sprintf("small/d%02d/f%04d", i/100, i), Type: '0', Mode: 0o644,
			Data: testimage.Random(uint64(1000+i), 512+(i*977)%16384)})
	}
	repo, img = push("small", must(t)(testimage.Image(small)), 4<<20)
	dirs, _ = mountImage(repo, img)
	lazyMerged = overlay(dirs...)
	local = t.TempDir()
	for _, e := range small {
		p := filepath.Join(local, e.Name)
		if e.Type == '5' {
			_ = os.MkdirAll(p, 0o755)
		} else if err := os.WriteFile(p, e.Data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	localMerged = overlay(local)
	if _, err := readTree(filepath.Join(lazyMerged, "small")); err != nil { // fetch it all
		t.Fatal(err)
	}
	readSmall := func(p string) (int64, error) {
		n, err := readTree(p)
		if err == nil && n != smallFiles {
			err = fmt.Errorf("%d files, want %d", n, smallFiles)
		}
		return int64(n), err
	}
	compareReads(t, lazyMerged, localMerged, "small", readSmall, func(what string, lazy, local float64) {
		fmt.Printf("  %d small cached files, %-18s lazy %7.0f files/s   overlayfs %7.0f files/s   ratio %.2f (target >= 0.7)\n",
			smallFiles, what+":", lazy, local, lazy/local)
	})
}

// compareReads times read (which returns an amount: bytes, files) of rel
// under the lazy and the local overlay, three times each, with the page
// cache hot and then dropped, and reports the medians in amount/s.
func compareReads(t *testing.T, lazyDir, localDir, rel string, read func(string) (int64, error), report func(what string, lazy, local float64)) {
	t.Helper()
	for _, hot := range []bool{true, false} {
		var lz, ov []float64
		for r := 0; r < 3; r++ {
			for _, side := range []struct {
				dir string
				out *[]float64
			}{{lazyDir, &lz}, {localDir, &ov}} {
				p := filepath.Join(side.dir, rel)
				if hot {
					_, _ = read(p)
				} else {
					dropCaches()
				}
				start := time.Now()
				n, err := read(p)
				if err != nil {
					t.Fatal(err)
				}
				*side.out = append(*side.out, float64(n)/time.Since(start).Seconds())
			}
		}
		what := "page cache hot"
		if !hot {
			what = "page cache dropped"
		}
		report(what, medianF(lz), medianF(ov))
	}
}

// TestBenchDaemonFootprint is part of `make bench-lazy`: starlingd with 100
// lazily mounted layers, at GOMAXPROCS 2 and 16: resident memory and OS
// threads, against the targets (under 100 MiB and 300 threads).
func TestBenchDaemonFootprint(t *testing.T) {
	if os.Getenv("STARLING_BENCH") != "1" {
		t.Skip("benchmark; run with make bench-lazy")
	}
	s := newStack(t, noFetchAhead)
	const n = 100
	bb, err := testimage.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	layers := []testimage.Layer{bb}
	for i := 0; i < n; i++ {
		layers = append(layers, testimage.Layer{
			{Name: fmt.Sprintf("l%03d/", i), Type: '5', Mode: 0o755},
			{Name: fmt.Sprintf("l%03d/f", i), Type: '0', Mode: 0o644, Data: testimage.Random(uint64(i), 4096)},
		})
	}
	_, esgz := s.converted("hundred", must(t)(testimage.Image(layers...)))
	s.pull(esgz)
	fmt.Printf("\nbench-footprint: starlingd with %d lazily mounted layers\n", n)
	for _, procs := range []int{2, 16} {
		s.sd.Stop()
		s.sd = testenv.Start(t, "starlingd", []string{"GOMAXPROCS=" + strconv.Itoa(procs)}, testenv.Bin(t, "starlingd"), s.sdArgs...)
		testenv.WaitFor(t, 60*time.Second, "layers mounted again", func() bool {
			return strings.Count(s.sd.Log(), "remote snapshot mounted again") >= n
		})
		// Read through every layer, so that each has served requests.
		if out, err := s.ctrRun(esgz, "/bin/sh", "-c", "cat /l*/f | wc -c"); err != nil || strings.TrimSpace(out) != strconv.Itoa(n*4096) {
			t.Fatalf("%v %q", err, out)
		}
		rss, threads := procStatus(t, s.sd.Cmd.Process.Pid)
		fmt.Printf("  GOMAXPROCS %2d: resident %5.1f MiB (target < 100)   threads %3d (target < 300)\n", procs, float64(rss)/1024, threads)
	}
}

func procStatus(t *testing.T, pid int) (rssKiB, threads int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rssKiB, _ = strconv.Atoi(f[1])
		case "Threads:":
			threads, _ = strconv.Atoi(f[1])
		}
	}
	return rssKiB, threads
}

func readFile(p string) (int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return io.Copy(io.Discard, f)
}

// readTree reads every regular file under dir, as `find -exec cat` does.
func readTree(dir string) (int, error) {
	n := 0
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		n++
		_, err = readFile(p)
		return err
	})
	return n, err
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func medianF(fs []float64) float64 {
	s := append([]float64(nil), fs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
