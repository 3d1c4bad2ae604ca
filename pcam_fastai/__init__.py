__version__ = "0.1.0"

import warnings
# fastai's layers call torch.jit.script at import, which torch >= 2.10 deprecates
# with a FutureWarning users cannot act on
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning,
                        module=r'torch\.jit')
