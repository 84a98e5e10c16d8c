/* Signal delivery in the sandbox: a handler for a signal sent to itself (with FPU state kept),
 * SIGCHLD with SA_SIGINFO, SIGINT from a child interrupting a CPU-bound loop, SIGPIPE ignored. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
static volatile int got, chld;
static void on(int s) { got = s; }
static void on_chld(int s, siginfo_t *i, void *u) { (void)i; (void)u; chld++; }
int main(void) {
    double d = 1.5;
    signal(SIGUSR1, on);
    kill(getpid(), SIGUSR1);
    printf("self %d %.1f\n", got, d * 2);
    struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_sigaction = on_chld; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGCHLD, &sa, 0);
    pid_t c = fork();
    if (c == 0) _exit(3);
    int st; while (waitpid(c, &st, 0) < 0) ;
    printf("child %d chld>0 %d\n", WEXITSTATUS(st), chld > 0);
    signal(SIGINT, on); got = 0;
    pid_t k = fork();
    if (k == 0) { kill(getppid(), SIGINT); _exit(0); }
    while (!got) ;  /* CPU-bound: the kick interrupts this loop */
    printf("int %d\n", got);
    signal(SIGPIPE, SIG_IGN);
    int fds[2]; pipe(fds); close(fds[0]);
    printf("epipe %zd\n", write(fds[1], "x", 1));
    return 0;
}
