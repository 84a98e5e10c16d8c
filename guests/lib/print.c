/*
 * A small printf for the console: %d %i %u %x %X %p %s %c %%, the '#' and '0' flags, a field width,
 * the l/ll/z length modifiers and %.*s. Output goes straight to the UART.
 */
#include "guest.h"

void console_putc(char c)
{
	if (c == '\n')
		uart_putc('\r');
	uart_putc(c);
}

static void put_num(u64 v, unsigned base, bool upper, int width, char pad, const char *prefix)
{
	char buf[24];
	int n = 0;
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";

	do {
		buf[n++] = digits[v % base];
		v /= base;
	} while (v);
	int plen = (int)strlen(prefix);
	if (pad == '0')
		while (*prefix)
			console_putc(*prefix++);
	for (int w = n + plen; w < width; w++)
		console_putc(pad);
	while (*prefix)
		console_putc(*prefix++);
	while (n)
		console_putc(buf[--n]);
}

int printf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			console_putc(*fmt);
			continue;
		}
		fmt++;
		bool alt = false;
		char pad = ' ';
		int width = 0, prec = -1, lng = 0;
		for (;; fmt++) {
			if (*fmt == '#')
				alt = true;
			else if (*fmt == '0')
				pad = '0';
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (fmt[0] == '.' && fmt[1] == '*') {
			prec = va_arg(ap, int);
			fmt += 2;
		}
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			long long v = lng ? va_arg(ap, long long) : va_arg(ap, int);
			if (v < 0) {
				put_num((u64)-v, 10, false, width, pad, "-");
			} else {
				put_num((u64)v, 10, false, width, pad, "");
			}
			break;
		}
		case 'u':
			put_num(lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, false, width, pad, "");
			break;
		case 'x':
		case 'X':
			put_num(lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, *fmt == 'X', width, pad,
				alt ? "0x" : "");
			break;
		case 'p':
			put_num((u64)(uintptr_t)va_arg(ap, void *), 16, false, width, pad, "0x");
			break;
		case 'c':
			console_putc((char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			for (int i = 0; s[i] && (prec < 0 || i < prec); i++)
				console_putc(s[i]);
			break;
		}
		case '%':
			console_putc('%');
			break;
		case 0:
			fmt--;
			break;
		default:
			console_putc('%');
			console_putc(*fmt);
		}
	}
	va_end(ap);
	return 0;
}
