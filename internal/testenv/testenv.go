// Package testenv starts the real parts starling's tests run against — a
// registry, containerd, network namespaces — in temporary directories, and
// stops them when the test ends, also when it fails.
package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CI reports whether the tests run in CI, where a missing part is a failure
// rather than a reason to skip.
func CI() bool { return os.Getenv("CI") == "true" }

// Require skips (or, in CI, fails) the test unless it runs as root and every
// named binary is on PATH.
func Require(t testing.TB, bins ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test; -short given")
	}
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root")
	}
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			skipOrFail(t, fmt.Sprintf("needs %s on PATH (make deps installs it)", b))
		}
	}
}

func skipOrFail(t testing.TB, why string) {
	t.Helper()
	if CI() {
		t.Fatal(why)
	}
	t.Skip(why)
}

// FreePort returns a TCP port on loopback that nothing listens on now.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Proc is a process started for a test; its output goes to LogPath.
type Proc struct {
	Cmd     *exec.Cmd
	LogPath string
	done    chan struct{}
	err     error
}

// Start runs name with args in the background. The process is killed (its
// whole process group) when the test ends; its log is printed if the test failed.
func Start(t testing.TB, logName string, env []string, name string, args ...string) *Proc {
	t.Helper()
	return StartIn(t, "", logName, env, name, args...)
}

// StartIn is Start inside network namespace netns ("" for the host's).
func StartIn(t testing.TB, netns, logName string, env []string, name string, args ...string) *Proc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), logName+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	var cmd *exec.Cmd
	if netns != "" {
		cmd = exec.Command("ip", append([]string{"netns", "exec", netns, name}, args...)...)
	} else {
		cmd = exec.Command(name, args...)
	}
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &Proc{Cmd: cmd, LogPath: logPath, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); lf.Close(); close(p.done) }()
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			if b, err := os.ReadFile(logPath); err == nil {
				t.Logf("--- log of %s (%s) ---\n%s", logName, logPath, tail(b, 8000))
			}
		}
	})
	return p
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// Stop sends SIGTERM to the process group, then SIGKILL after 10 s.
func (p *Proc) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// Kill sends SIGKILL to the process group and waits for it.
func (p *Proc) Kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Log returns what the process has written so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

// WaitFor polls cond every 50 ms until it is true or timeout passes.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitTCP waits until addr accepts connections (from the host's namespace).
func WaitTCP(t testing.TB, p *Proc, addr string, timeout time.Duration) {
	t.Helper()
	WaitFor(t, timeout, "listener on "+addr, func() bool {
		if p != nil && p.Exited() {
			t.Fatalf("%s exited before listening on %s:\n%s", p.Cmd.Path, addr, tail([]byte(p.Log()), 4000))
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// Run runs a command and returns its combined output; a failure fails the test.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := RunErr(context.Background(), name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// RunErr runs a command and returns its combined output and error.
func RunErr(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	return buf.String(), err
}

// Bin returns the path of one of starling's own binaries: $STARLING_BIN/name
// when the Makefile set it, else a fresh `go build` into a temporary directory.
func Bin(t testing.TB, name string) string {
	t.Helper()
	if d := os.Getenv("STARLING_BIN"); d != "" {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	root := ModuleRoot(t)
	out := filepath.Join(t.TempDir(), name)
	cmd := exec.Command("go", "build", "-o", out, "./cmd/"+name)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", name, err, b)
	}
	return out
}

// ModuleRoot is the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	d, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		parent := filepath.Dir(d)
		if parent == d {
			t.Fatal("go.mod not found above the test's directory")
		}
		d = parent
	}
}

// Itoa is strconv.Itoa, for building command lines.
func Itoa(i int) string { return strconv.Itoa(i) }
