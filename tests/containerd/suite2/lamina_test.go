// Package suite2 runs containerd 2.x's own snapshotter conformance suite
// (github.com/containerd/containerd/v2/core/snapshots/testsuite) against lamina's
// containerd snapshotter, a gRPC server of containerd.services.snapshots.v1 on a unix
// socket, reached through containerd's proxy client (core/snapshots/proxy), as
// containerd 2.x reaches a proxy plugin. tests/containerd/suite is the same for 1.6.
//
// Every subtest gets a fresh snapshotter process with its own home:
//
//	$LAMINA_SNAPSHOTTER_CMD --home ROOT/home --backend $LAMINA_BACKEND snapshotter --socket SOCK
//
// LAMINA_SNAPSHOTTER_CMD is a JSON array or a space-separated command line (default
// "python3 -m lamina"; global options such as --opt overlay.layers=dir go in it);
// LAMINA_BACKEND defaults to "auto"; LAMINA_SNAPSHOTTER_CWD, if set, is its working
// directory; LAMINA_SUITE_LOGDIR, if set, keeps each process's output there (else it
// goes beside the subtest's temporary directory). The suite runs under the name
// "lamina": containerd's suite changes what it checks only for its own snapshotters'
// names (Rename leaves directories of lower layers alone for "overlayfs").
//
// Built by scripts/build-containerd2-suite.sh (in the engines' lab), run by
// tests/containerd/test_suite2.py.
package suite2

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/version"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	// The name the suite runs under: containerd's suite exempts its own snapshotters by
	// name from some checks, lamina's name from none.
	suiteName    = "lamina"
	startTimeout = 60 * time.Second
	stopTimeout  = 30 * time.Second
	// The longest unix socket path (sun_path is 108 bytes with its NUL).
	maxSocketPath = 107
)

var started int64

// spawns carries commands to the one goroutine that starts them all (see spawner).
var spawns = make(chan spawnRequest)

type spawnRequest struct {
	cmd  *exec.Cmd
	done chan<- error
}

// spawner starts every server from one OS thread that lives as long as the suite.
// Pdeathsig is sent when the thread that forked the child ends, not the process: Go
// ends a thread whose goroutine exits while locked to it (containerd's mount code
// locks threads), and a server forked from such a thread was killed in mid-subtest.
func spawner() {
	runtime.LockOSThread() // never unlocked: the thread is this goroutine's for good
	for req := range spawns {
		req.done <- req.cmd.Start()
	}
}

func init() {
	go spawner()
}

// snapshotterCommand is the command line that starts lamina, before its options.
func snapshotterCommand() ([]string, error) {
	raw := strings.TrimSpace(os.Getenv("LAMINA_SNAPSHOTTER_CMD"))
	if raw == "" {
		return []string{"python3", "-m", "lamina"}, nil
	}
	if !strings.HasPrefix(raw, "[") {
		return strings.Fields(raw), nil
	}
	var argv []string
	if err := json.Unmarshal([]byte(raw), &argv); err != nil {
		return nil, fmt.Errorf("LAMINA_SNAPSHOTTER_CMD is not a JSON array of strings: %w", err)
	}
	if len(argv) == 0 {
		return nil, errors.New("LAMINA_SNAPSHOTTER_CMD is an empty array")
	}
	return argv, nil
}

func backend() string {
	if b := os.Getenv("LAMINA_BACKEND"); b != "" {
		return b
	}
	return "auto"
}

// socketPath is ROOT/lamina.sock, or one in a short directory of its own when that is too long.
func socketPath(root string) (string, func(), error) {
	sock := filepath.Join(root, "lamina.sock")
	if len(sock) <= maxSocketPath {
		return sock, func() {}, nil
	}
	dir, err := os.MkdirTemp("/tmp", "lss-")
	if err != nil {
		return "", nil, err
	}
	return filepath.Join(dir, "s.sock"), func() { os.RemoveAll(dir) }, nil
}

// tail is the last n lines of the file at path, for error messages.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(no log)"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitSocket waits until something accepts connections on sock, or the process exits.
func waitSocket(sock string, exited <-chan struct{}, logPath string) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("lamina snapshotter exited before listening on %s:\n%s", sock, tail(logPath, 40))
		default:
		}
		if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("lamina snapshotter did not listen on %s within %s:\n%s", sock, startTimeout, tail(logPath, 40))
}

// server is one running `lamina snapshotter` and what stopping it takes.
type server struct {
	cmd     *exec.Cmd
	logFile *os.File
	logPath string
	exited  chan struct{}
	waitErr error
	done    func() // removes the socket's own directory, if it has one
}

// kill ends the server at once (a failed start).
func (s *server) kill() {
	_ = s.cmd.Process.Kill()
	<-s.exited
	s.logFile.Close()
	s.done()
}

// stop asks the server to stop (SIGTERM) and checks that it exits 0 in time.
func (s *server) stop() []string {
	var errs []string
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.waitErr != nil {
			errs = append(errs, fmt.Sprintf("lamina snapshotter did not exit 0 on SIGTERM: %v", s.waitErr))
		}
	case <-time.After(stopTimeout):
		_ = s.cmd.Process.Kill()
		<-s.exited
		errs = append(errs, fmt.Sprintf("lamina snapshotter did not stop within %s of SIGTERM", stopTimeout))
	}
	s.logFile.Close()
	s.done()
	return errs
}

// start starts `lamina snapshotter` on a home below root and waits until it listens on sock.
func start(ctx context.Context, root, sock string, done func()) (*server, error) {
	argv, err := snapshotterCommand()
	if err != nil {
		return nil, err
	}
	n := atomic.AddInt64(&started, 1)
	logDir := os.Getenv("LAMINA_SUITE_LOGDIR")
	if logDir == "" {
		logDir = filepath.Dir(root)
	}
	logPath := filepath.Join(logDir, fmt.Sprintf("lamina-%03d-%s.log", n, filepath.Base(filepath.Dir(root))))
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	args := append(append([]string{}, argv[1:]...),
		"--home", filepath.Join(root, "home"), "--backend", backend(), "snapshotter", "--socket", sock)
	fmt.Fprintf(logFile, "# %s %s\n", argv[0], strings.Join(args, " "))
	cmd := exec.Command(argv[0], args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = os.Getenv("LAMINA_SNAPSHOTTER_CWD")
	// Its own process group, so that a Ctrl-C of the suite does not reach it first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	result := make(chan error, 1)
	spawns <- spawnRequest{cmd, result}
	if err := <-result; err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %v: %w", argv, err)
	}
	// Goes to the subtest's log (logtest): test_suite2.py finds a failed subtest's server by it.
	log.G(ctx).WithField("log", logPath).WithField("pid", cmd.Process.Pid).Info("lamina snapshotter started")
	s := &server{cmd: cmd, logFile: logFile, logPath: logPath, exited: make(chan struct{}), done: done}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()
	if err := waitSocket(sock, s.exited, logPath); err != nil {
		s.kill()
		return nil, err
	}
	return s, nil
}

// newSnapshotter is the suite's SnapshotterFunc: a fresh lamina snapshotter on a home
// in root, and containerd's proxy client on its socket.
func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sock, removeSockDir, err := socketPath(root)
	if err != nil {
		return nil, nil, err
	}
	s, err := start(ctx, root, sock, removeSockDir)
	if err != nil {
		removeSockDir()
		return nil, nil, err
	}
	// The socket is known to listen: NewClient connects lazily, on the first call.
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		s.kill()
		return nil, nil, fmt.Errorf("a client of %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), suiteName)
	cleanup := func() error {
		var errs []string
		if err := conn.Close(); err != nil {
			errs = append(errs, fmt.Sprintf("closing the connection: %v", err))
		}
		errs = append(errs, s.stop()...)
		if len(errs) > 0 {
			return fmt.Errorf("%s\n--- %s ---\n%s", strings.Join(errs, "; "), s.logPath, tail(s.logPath, 40))
		}
		return nil
	}
	return sn, cleanup, nil
}

func TestLaminaSnapshotter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("containerd's snapshotter suite mounts: it needs root")
	}
	// test_suite2.py reads this line for the log.
	argv, err := snapshotterCommand()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd snapshotter testsuite %s (%s), as %q, backend %s, lamina: %s",
		version.Version, version.Package, suiteName, backend(), strings.Join(argv, " "))
	testsuite.SnapshotterSuite(t, suiteName, newSnapshotter)
}

// TestRenameAsOverlayfs runs the suite under containerd's own overlayfs snapshotter's
// name, for its Rename subtest only (test_suite2.py: -test.run 'TestRenameAsOverlayfs/^Rename$'
// with LAMINA_SUITE_AS_OVERLAYFS=1): that name leaves out the rename of a lower layer's
// directory, which overlayfs without redirect_dir refuses (EXDEV), and checks the rest
// (files renamed over and out of a lower layer's directory).
func TestRenameAsOverlayfs(t *testing.T) {
	if os.Getenv("LAMINA_SUITE_AS_OVERLAYFS") != "1" {
		t.Skip("only with LAMINA_SUITE_AS_OVERLAYFS=1 (and -test.run 'TestRenameAsOverlayfs/^Rename$')")
	}
	if os.Geteuid() != 0 {
		t.Skip("containerd's snapshotter suite mounts: it needs root")
	}
	testsuite.SnapshotterSuite(t, "overlayfs", newSnapshotter)
}
