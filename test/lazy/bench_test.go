//go:build bench

package lazy_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
)

// TestBenchLazy is `make bench-lazy`, not a test: it runs only with
// STARLING_BENCH=1 and asserts nothing about time. It measures the cold start
// of a python image (pull + `python3 -V`) from a registry behind an emulated
// 100 Mbit/s link (tbf on a veth into a network namespace) with 10 ms added
// to every request: a full pull on containerd's overlayfs against a lazy
// pull with starling.
func TestBenchLazy(t *testing.T) {
	if os.Getenv("STARLING_BENCH") != "1" {
		t.Skip("benchmark; run with make bench-lazy")
	}
	layout := os.Getenv("STARLING_BENCH_LAYOUT")
	if layout == "" {
		t.Fatal("STARLING_BENCH_LAYOUT names the OCI layout of the python image")
	}
	rate := os.Getenv("RATE")
	if rate == "" {
		rate = "100mbit"
	}
	s := newStack(t, "")

	// A registry host behind a shaped link.
	ns := fmt.Sprintf("stlb%d", os.Getpid()%100000)
	hostIf, nsIf := ns+"h", ns+"n"
	testenv.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _, _ = testenv.RunErr(context.Background(), "ip", "netns", "del", ns) })
	testenv.Run(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIf)
	t.Cleanup(func() { _, _ = testenv.RunErr(context.Background(), "ip", "link", "del", hostIf) })
	testenv.Run(t, "ip", "link", "set", nsIf, "netns", ns)
	testenv.Run(t, "ip", "addr", "add", "10.231.77.1/24", "dev", hostIf)
	testenv.Run(t, "ip", "link", "set", hostIf, "up")
	testenv.Run(t, "ip", "netns", "exec", ns, "ip", "addr", "add", "10.231.77.2/24", "dev", nsIf)
	testenv.Run(t, "ip", "netns", "exec", ns, "ip", "link", "set", nsIf, "up")
	testenv.Run(t, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
	for _, c := range [][]string{
		{"tc", "qdisc", "add", "dev", hostIf, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"},
		{"ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", nsIf, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"},
	} {
		testenv.Run(t, c[0], c[1:]...)
	}
	remote := "10.231.77.2:5000"
	testenv.StartRegistryAt(t, ns, remote)
	testenv.WaitTCP(t, nil, remote, 20*time.Second)
	// 10 ms per request, added by our own proxy (netem does not work here).
	proxy := testenv.StartCountingProxy(t, remote)
	proxy.SetLatency(10 * time.Millisecond)

	ref := proxy.Addr + "/python:3"
	lazyRef := proxy.Addr + "/python:3-esgz"
	testenv.Run(t, "skopeo", "copy", "--quiet", "--dest-tls-verify=false", "oci:"+layout+":latest", "docker://"+ref)
	// The files `python3 -V` opens, as starlingd's debug log lists them
	// ("file opened"): what `ctr-remote image optimize` would record by
	// running the workload. They go before the prefetch landmark, and are
	// fetched in one request per layer as soon as the layer is resolved.
	prio := filepath.Join(t.TempDir(), "prioritized")
	if err := os.WriteFile(prio, []byte(strings.Join(pythonFiles, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	s.run("convert", "--prioritized-files", prio, ref, lazyRef)
	dropCaches()

	ctx := context.Background()
	timed := func(name string, f func()) (time.Duration, int64) {
		proxy.Reset()
		start := time.Now()
		f()
		d := time.Since(start)
		t.Logf("%s: %.2f s, registry sent %.1f MB in %d requests", name, d.Seconds(), float64(proxy.BytesServed())/1e6, proxy.Requests())
		return d, proxy.BytesServed()
	}
	full, fullBytes := timed("full pull (overlayfs) + python3 -V", func() {
		if out, err := s.ctd.Ctr(ctx, "image", "pull", "--plain-http", ref); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if out, err := s.ctd.Ctr(ctx, "run", "--rm", ref, "full", "python3", "-V"); err != nil || !strings.HasPrefix(out, "Python 3") {
			t.Fatalf("%v\n%s", err, out)
		}
	})
	var warms []time.Duration
	for i := 0; i < 3; i++ {
		d, _ := timed("run of the full-pulled image again (container start alone)", func() {
			if out, err := s.ctd.Ctr(ctx, "run", "--rm", ref, fmt.Sprintf("warm%d", i), "python3", "-V"); err != nil || !strings.HasPrefix(out, "Python 3") {
				t.Fatalf("%v\n%s", err, out)
			}
		})
		warms = append(warms, d)
	}
	warm := median(warms)
	var pullTime time.Duration
	lazy, lazyBytes := timed("starling lazy pull + python3 -V", func() {
		start := time.Now()
		s.pull(lazyRef)
		pullTime = time.Since(start)
		out, err := s.ctrRun(lazyRef, "python3", "-V")
		if err != nil || !strings.HasPrefix(out, "Python 3") {
			t.Fatalf("%v\n%s", err, out)
		}
	})
	// Warm: the image's bytes are all local now (the lazy run read what
	// python needs; read the rest so that every file is local).
	if out, err := s.ctrRun(lazyRef, "sh", "-c", "find / -xdev -type f -exec cat {} + > /dev/null; echo done"); err != nil || !strings.Contains(out, "done") {
		t.Fatalf("%v\n%s", err, out)
	}
	var lazyWarms []time.Duration
	for i := 0; i < 3; i++ {
		d, _ := timed("starling run again (warm, every byte local)", func() {
			if out, err := s.ctrRun(lazyRef, "python3", "-V"); err != nil || !strings.HasPrefix(out, "Python 3") {
				t.Fatalf("%v\n%s", err, out)
			}
		})
		lazyWarms = append(lazyWarms, d)
	}
	lazyWarm := median(lazyWarms)
	if os.Getenv("STARLING_BENCH_LOG") != "" {
		fmt.Println(s.sd.Log())
	}
	fmt.Printf("\nbench-lazy: python image, %s link, +10 ms per request, %s\n", rate, runtime.GOARCH)
	fmt.Printf("  full pull on overlayfs + run: %6.2f s   registry sent %6.1f MB\n", full.Seconds(), float64(fullBytes)/1e6)
	fmt.Printf("  starling lazy pull + run:     %6.2f s   registry sent %6.1f MB   (pull %.2f s, run %.2f s)\n",
		lazy.Seconds(), float64(lazyBytes)/1e6, pullTime.Seconds(), (lazy - pullTime).Seconds())
	fmt.Printf("  container start alone (warm, overlayfs): %.2f s   starling: %.2f s   ratio %.2f (target <= 1.1)\n",
		warm.Seconds(), lazyWarm.Seconds(), lazyWarm.Seconds()/warm.Seconds())
	fmt.Printf("  speed-up: %.1fx   (target: >= 10x, and <= 0.8 s as the reference stargz-snapshotter measured here)\n", full.Seconds()/lazy.Seconds())
}

var pythonFiles = []string{
	"etc/ld.so.cache",
	"usr/bin/python3.11",
	"usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
	"usr/lib/x86_64-linux-gnu/libc.so.6",
	"usr/lib/x86_64-linux-gnu/libm.so.6",
	"usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
	"usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10",
	"usr/lib/locale/C.utf8/LC_CTYPE",
	"usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
	"etc/passwd",
	"etc/group",
}

func dropCaches() { _ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200) }
