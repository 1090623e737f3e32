// Package suite runs containerd's own snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite, containerd 1.6) against
// lamina's containerd snapshotter, a gRPC server of containerd.services.snapshots.v1
// on a unix socket, reached the way containerd reaches a proxy plugin.
//
// Every subtest gets a fresh snapshotter process with its own home:
//
//	$LAMINA_SNAPSHOTTER_CMD --home ROOT/home --backend $LAMINA_BACKEND snapshotter --socket SOCK
//
// LAMINA_SNAPSHOTTER_CMD is a JSON array or a space-separated command line (default
// "python3 -m lamina"); LAMINA_BACKEND defaults to "auto"; LAMINA_SNAPSHOTTER_CWD, if
// set, is its working directory; LAMINA_SUITE_LOGDIR, if set, keeps each process's
// output there (else it goes with the subtest's temporary directory). The binary is
// built by scripts/build-containerd-suite.sh and run by tests/containerd/test_suite.py.
package suite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

const (
	startTimeout = 60 * time.Second
	stopTimeout  = 30 * time.Second
	// The longest unix socket path (sun_path is 108 bytes with its NUL).
	maxSocketPath = 107
)

var started int64

// snapshotterCommand is the command line that starts lamina, before its options.
func snapshotterCommand() ([]string, error) {
	raw := strings.TrimSpace(os.Getenv("LAMINA_SNAPSHOTTER_CMD"))
	if raw == "" {
		return []string{"python3", "-m", "lamina"}, nil
	}
	if strings.HasPrefix(raw, "[") {
		var argv []string
		if err := json.Unmarshal([]byte(raw), &argv); err != nil {
			return nil, fmt.Errorf("LAMINA_SNAPSHOTTER_CMD is not a JSON array of strings: %w", err)
		}
		if len(argv) == 0 {
			return nil, errors.New("LAMINA_SNAPSHOTTER_CMD is an empty array")
		}
		return argv, nil
	}
	return strings.Fields(raw), nil
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
func waitSocket(sock string, exited <-chan struct{}, log string) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("lamina snapshotter exited before listening on %s:\n%s", sock, tail(log, 40))
		default:
		}
		if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("lamina snapshotter did not listen on %s within %s:\n%s", sock, startTimeout, tail(log, 40))
}

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	argv, err := snapshotterCommand()
	if err != nil {
		return nil, nil, err
	}
	home := filepath.Join(root, "home")
	sock, removeSockDir, err := socketPath(root)
	if err != nil {
		return nil, nil, err
	}
	n := atomic.AddInt64(&started, 1)
	logDir := os.Getenv("LAMINA_SUITE_LOGDIR")
	if logDir == "" {
		logDir = filepath.Dir(root)
	}
	logPath := filepath.Join(logDir, fmt.Sprintf("lamina-%03d-%s.log", n, filepath.Base(filepath.Dir(root))))
	logFile, err := os.Create(logPath)
	if err != nil {
		removeSockDir()
		return nil, nil, err
	}
	args := append(append([]string{}, argv[1:]...),
		"--home", home, "--backend", backend(), "snapshotter", "--socket", sock)
	fmt.Fprintf(logFile, "# %s %s\n", argv[0], strings.Join(args, " "))
	cmd := exec.Command(argv[0], args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = os.Getenv("LAMINA_SNAPSHOTTER_CWD")
	// Its own process group, so that a Ctrl-C of the suite does not reach it first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		removeSockDir()
		return nil, nil, fmt.Errorf("starting %v: %w", argv, err)
	}
	// Goes to the subtest's log (logtest): test_suite.py finds a failed subtest's server by it.
	log.G(ctx).WithField("log", logPath).WithField("pid", cmd.Process.Pid).Info("lamina snapshotter started")
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	kill := func() {
		_ = cmd.Process.Kill()
		<-exited
		logFile.Close()
		removeSockDir()
	}
	if err := waitSocket(sock, exited, logPath); err != nil {
		kill()
		return nil, nil, err
	}

	dialCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, "unix://"+sock,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}),
	)
	if err != nil {
		kill()
		return nil, nil, fmt.Errorf("dialing %s: %w\n%s", sock, err, tail(logPath, 40))
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lamina")

	cleanup := func() error {
		var errs []string
		if err := conn.Close(); err != nil {
			errs = append(errs, fmt.Sprintf("closing the connection: %v", err))
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			if waitErr != nil {
				errs = append(errs, fmt.Sprintf("lamina snapshotter did not exit 0 on SIGTERM: %v", waitErr))
			}
		case <-time.After(stopTimeout):
			_ = cmd.Process.Kill()
			<-exited
			errs = append(errs, fmt.Sprintf("lamina snapshotter did not stop within %s of SIGTERM", stopTimeout))
		}
		logFile.Close()
		removeSockDir()
		if len(errs) > 0 {
			return fmt.Errorf("%s\n--- %s ---\n%s", strings.Join(errs, "; "), logPath, tail(logPath, 40))
		}
		return nil
	}
	return sn, cleanup, nil
}

func TestLaminaSnapshotter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("containerd's snapshotter suite mounts: it needs root")
	}
	testsuite.SnapshotterSuite(t, "Lamina", newSnapshotter)
}
