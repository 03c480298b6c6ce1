"""The notes' own train / validation / test code (section 2), as written there."""
import torch


def train(train_loader, val_loader, model):
    best_acc = 0.0
    for epoch in range(num_epoch):
        train_acc = 0.0
        train_loss = 0.0
        val_acc = 0.0
        val_loss = 0.0

        # training
        model.train() # set the model to training mode
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device), y.to(device)
            outputs = model(x)
            batch_loss = loss(outputs, y)
            _, train_pred = torch.max(outputs, 1) # get the index of the class with the highest probability

            train_acc += (train_pred.cpu() == y.cpu()).sum().item()
            train_loss += batch_loss.item()

            batch_loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        # validation
        model.eval() # set the model to evaluation mode
        with torch.no_grad():
            for i, (x,y) in enumerate(val_loader):
                x, y = x.to(device), y.to(device)
                outputs = model(x)
                batch_loss = loss(outputs, y)
                _, val_pred = torch.max(outputs, 1)

                val_acc += (val_pred.cpu() == y.cpu()).sum().item() # get the index of the class with the highest probability
                val_loss += batch_loss.item()

        print(
            f'[{epoch + 1:03d}/{num_epoch:03d}]',
            f'Train Acc: {train_acc/len(train_loader.dataset):3.6f}',
            f'Loss: {train_loss/len(train_loader):3.6f}',
            f'| Val Acc: {val_acc/len(val_loader.dataset):3.6f}',
            f'loss: {val_loss/len(val_loader):3.6f}'
        )

        # if the model improves, save a checkpoint at this epoch
        if val_acc > best_acc:
            best_acc = val_acc
            torch.save(model.state_dict(), model_path)
            print(f'saving model with acc {best_acc/len(val_loader.dataset):.3f}')

train(train_loader, val_loader, model, )


def test(test_loader, model, device):
    predict = []
    model.eval() # set the model to evaluation mode
    with torch.no_grad():
        for i, x in enumerate(test_loader):
            x = x.to(device)
            outputs = model(x)
            _, test_pred = torch.max(outputs, 1) # get the index of the class with the highest probability

            for y in test_pred.cpu().numpy():
                predict.append(y)

    return predict

# reload the best model
del model
model = Classifier().to(device)
ckpt = torch.load(model_path, map_location='cuda:0')
model.load_state_dict(ckpt)
predict = test(test_loader, model, device)
